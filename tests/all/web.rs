//! The web page, driven in a real headless Chromium against a coordinator on
//! loopback whose `qemu` clouds run instances as local processes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_protocol::api::{Build, Cloud, CloudKind, Status};
use kiln_tests::bed::Bed;
use kiln_tests::browser::Browser;
use serde_json::json;

/// Where the test run saves its screenshots for people to look at.
fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots")
}

/// A coordinator with cloud `local` and a browser logged in on its page.
async fn start() -> (Bed, Browser) {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{}/", bed.addrs().api)).await;
    log_in(&browser, bed.client.token().unwrap()).await;
    (bed, browser)
}

/// Logs in with `token` on the login form the page shows first.
async fn log_in(browser: &Browser, token: &str) {
    browser.wait_text("h1", "Log in to kiln").await;
    browser.fill("#login-token", token).await;
    browser.click("#login-form button[type=submit]").await;
    browser.wait_text("h1", "Image generators").await;
}

/// Adds a generator in the page with `script` and base image "process" on `cloud`, and saves it.
async fn add_generator(browser: &Browser, name: &str, script: &str, cloud: &str) {
    browser.click("#add-generator").await;
    browser.fill("#new-name", name).await;
    browser.click("#new-form button[type=submit]").await;
    browser.wait_text("h1", name).await;
    browser.fill("#script", script).await;
    browser.fill(&format!("fieldset[data-cloud={cloud:?}] input[name=base_image]"), "process").await;
    browser.click("#save").await;
    browser.wait_text(".saved", "Saved revision 1").await;
}

/// Records every status the page shows from now on, however briefly.
async fn record_statuses(browser: &Browser) {
    browser
        .eval(
            "window.seen = new Set();
             new MutationObserver(() => document.querySelectorAll('#builds .status').forEach(e => window.seen.add(e.textContent.trim())))
               .observe(document.body, { subtree: true, childList: true, characterData: true });",
        )
        .await;
}

/// Opens the page of the generator's (only) build from its build list.
async fn open_build(browser: &Browser) {
    browser.click("#builds li[data-build] > a").await;
    browser.wait_text("h1", "Build ").await;
}

async fn only_build(bed: &Bed, generator: &str) -> Build {
    let builds: Vec<Build> = bed.client.get(&format!("/v1/builds?generator={generator}")).await.unwrap();
    assert_eq!(builds.len(), 1);
    builds.into_iter().next().unwrap()
}

// Adding, saving and building a generator in the page: the build shows as running, turns
// successful, and its page shows the output image and the script's log; both views fit a phone.
#[tokio::test]
async fn page_adds_saves_and_builds_a_generator() {
    let (bed, browser) = start().await;
    add_generator(&browser, "hello-page", "echo hello from the page", "local").await;
    browser.screenshot(&screenshots().join("generator-editor.png")).await;

    record_statuses(&browser).await;
    browser.click("#build").await;
    browser.wait_text("#builds", "successful").await;
    let seen = browser.eval("return [...window.seen]").await;
    assert!(seen.as_array().unwrap().iter().any(|s| s.as_str().unwrap().ends_with("running")), "seen: {seen}");
    browser.wait_until("document.querySelector('#builds .status-successful')", "a green badge").await;

    open_build(&browser).await;
    browser.wait_text("pre.log", "hello from the page").await;
    browser.wait_text(".log-note", "Log complete").await;
    let build = only_build(&bed, "hello-page").await;
    assert_eq!(build.status, Status::Successful);
    let image = build.targets[0].image.as_ref().expect("an image");
    browser.wait_text(".target", &image.name).await;
    browser.wait_text(".target", &image.id).await;
    browser.wait_text(".target", "Boot to agent").await;
    browser.screenshot(&screenshots().join("build-page.png")).await;

    // Readable on a phone: one column, nothing wider than the screen.
    browser.client.set_window_size(390, 900).await.unwrap();
    browser.wait_until("document.documentElement.scrollWidth <= window.innerWidth", "no sideways scroll").await;
    browser.screenshot(&screenshots().join("build-page-390.png")).await;
    browser.goto(&format!("http://{}/#/generators/hello-page", bed.addrs().api)).await;
    browser.wait_text("#builds", "successful").await;
    browser.wait_until("document.documentElement.scrollWidth <= window.innerWidth", "no sideways scroll").await;
    browser.screenshot(&screenshots().join("generator-editor-390.png")).await;
    browser.close().await;
}

// A failing script turns the build red ("failed"), and its page shows the exit status and
// the log's tail; an API error is shown in words where the user acted.
#[tokio::test]
async fn page_shows_a_failed_build() {
    let (bed, browser) = start().await;
    add_generator(&browser, "fails", "echo about to fail; exit 3", "local").await;
    browser.click("#build").await;
    browser.wait_text("#builds .status-failed", "failed").await;

    open_build(&browser).await;
    browser.wait_text(".build-status", "failed").await;
    browser.wait_text(".target", "exited with code 3").await;
    browser.wait_text(".target-error", "exit code 3").await;
    browser.wait_text("pre.log", "about to fail").await;
    browser.wait_text(".log-note", "Log complete").await;
    browser.wait_until("document.querySelector('#cancel').disabled", "Cancel disabled once ended").await;
    assert_eq!(only_build(&bed, "fails").await.status, Status::Failed);
    browser.screenshot(&screenshots().join("build-page-failed.png")).await;

    // Saving a generator with an empty script: the API's refusal appears in words next to Save.
    browser.goto(&format!("http://{}/#/", bed.addrs().api)).await;
    browser.click("#add-generator").await;
    browser.fill("#new-name", "empty").await;
    browser.click("#new-form button[type=submit]").await;
    browser.fill("#script", "").await;
    browser.click("#save").await;
    let alert = "document.querySelector('#editor [role=alert]:not([hidden])')?.textContent.includes('Error: ')";
    browser.wait_until(alert, "an error next to Save").await;
    browser.close().await;
}

// A cloud that asks for its password at every build prompts for it in the page; the build
// proceeds with it, and the page keeps it nowhere (no storage, no input); saves compare.
#[tokio::test]
async fn page_asks_for_the_password_at_each_build() {
    let (bed, browser) = start().await;
    let cloud = Cloud {
        name: "vault".parse().unwrap(),
        kind: CloudKind::Qemu,
        region: None,
        endpoint: None,
        options: BTreeMap::from([("ask_password".to_string(), "true".to_string())]),
        credentials: None,
    };
    let _: Cloud = bed.client.post("/v1/clouds", &cloud).await.unwrap();
    browser.eval("location.reload()").await;
    browser.wait_text("h1", "Image generators").await;
    add_generator(&browser, "secretive", "echo asked", "vault").await;

    let password = "pw-of-the-vault-4711";
    browser.click("#build").await;
    browser.wait_until("document.querySelector('#password-dialog').open", "the password prompt").await;
    browser.fill("#password-fields input[type=password]", password).await;
    browser.click("#password-form button[type=submit]").await;
    browser.wait_text("#builds", "successful").await;
    assert_eq!(only_build(&bed, "secretive").await.status, Status::Successful);

    let kept = browser
        .eval(
            "return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)
               + [...document.querySelectorAll('input, textarea')].map(e => e.value).join(' ')
               + document.documentElement.outerHTML",
        )
        .await;
    assert!(!kept.as_str().unwrap().contains(password), "the page kept the password");
    assert_eq!(browser.eval("return document.querySelectorAll('#password-fields input').length").await, json!(0));

    // Cancelling the prompt starts nothing.
    browser.click("#build").await;
    browser.wait_until("document.querySelector('#password-dialog').open", "the prompt again").await;
    browser.click("#password-form [data-close]").await;
    browser.wait_until("!document.querySelector('#password-dialog').open", "the prompt closed").await;
    assert_eq!(only_build(&bed, "secretive").await.status, Status::Successful);

    // A second save is a new revision, and the two compare line by line.
    browser.fill("#script", "echo asked twice").await;
    browser.click("#save").await;
    browser.wait_text(".saved", "Saved revision 2").await;
    browser.click("#compare").await;
    browser.wait_text(".diff .del", "- echo asked").await;
    browser.wait_text(".diff .add", "+ echo asked twice").await;
    browser.close().await;
}

// Without a login the page shows only its login form (a wrong token is refused in
// words); after it, the data. A form on another site that posts to the API with the
// session's cookie cannot cancel a build: it lacks the session's CSRF token.
#[tokio::test]
async fn page_needs_a_login_and_refuses_cross_site_posts() {
    let bed = Bed::start().await;
    bed.add_cloud("local").await;
    let _ = bed.create_generator(&Bed::spec("long", "sleep 300", &["local"])).await;
    let build = bed.start_build("long").await;
    let browser = Browser::start().await;
    let page = format!("http://{}/", bed.addrs().api);
    browser.goto(&page).await;
    browser.wait_text("h1", "Log in to kiln").await;
    assert_eq!(browser.eval("return document.querySelector('#main').innerText.includes('long')").await, json!(false));
    browser.fill("#login-token", "kiln_not-a-token").await;
    browser.click("#login-form button[type=submit]").await;
    browser.wait_text("#login-form [role=alert]", "not valid").await;
    log_in(&browser, bed.client.token().unwrap()).await;
    browser.wait_text("#main", "long").await;
    browser.wait_text("#who", "admin").await;
    let cookie_js = browser.eval("return document.cookie").await;
    assert_eq!(cookie_js, json!(""), "the session cookie is HttpOnly");

    // Other origins' pages auto-submit a form to the cancel route: from another
    // site the browser sends no cookie (SameSite=Strict); from the same site on
    // another port it does, and the missing CSRF token refuses it.
    let cancel = format!("{}v1/builds/{}/cancel", page, build.id);
    let form = format!(
        "<form id=f method=post action=\"{cancel}\" enctype=text/plain><input name=x value=y></form><script>f.submit()</script>"
    );
    for (host, refusal) in [("localhost", "unauthorized"), ("127.0.0.1", "CSRF")] {
        browser.goto(&attacker_page(host, &form).await).await;
        let cond = format!("document.body && document.body.innerText.includes('{refusal}')");
        browser.wait_until(&cond, "the API's refusal").await;
        let now: Build = bed.client.get(&format!("/v1/builds/{}", build.id)).await.unwrap();
        assert!(!now.cancel_requested, "a post from {host} cancelled the build");
        assert_eq!(now.status, Status::Running);
    }

    // The page itself can cancel, and logging out ends the session.
    browser.goto(&format!("{page}#/builds/{}", build.id)).await;
    browser.wait_text("h1", "Build ").await;
    browser.click("#cancel").await;
    browser.wait_text(".build-status", "cancelled").await;
    browser.click("#logout").await;
    browser.wait_text("h1", "Log in to kiln").await;
    browser.eval("location.reload()").await;
    browser.wait_text("h1", "Log in to kiln").await;
    browser.close().await;
}

/// Serves `html` at `/` on another loopback port (another origin), named by
/// `host`; returns its URL.
async fn attacker_page(host: &str, html: &str) -> String {
    let html = html.to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{host}:{}/", listener.local_addr().unwrap().port());
    let app = axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(html) }));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    url
}
