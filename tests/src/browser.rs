//! A headless Chromium driven over WebDriver (chromedriver + fantoccini), for
//! the web page's tests.
//!
//! Each [`Browser`] runs its own chromedriver on a free loopback port and its
//! own Chromium with a fresh profile directory; dropping it kills both (by pid).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The longest a test waits for the page to show something.
pub const PAGE_LIMIT: Duration = Duration::from_secs(60);

/// The flags Chromium runs with in tests.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
];

pub struct Browser {
    pub client: Client,
    // Field order: the driver is killed before the profile directory is removed.
    _driver: Driver,
    profile: TempDir,
}

/// chromedriver, killed (by pid) when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Driver(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver (scripts/install-deps installs chromium-driver)"),
        );
        let profile = tempfile::tempdir().expect("tempdir");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen on port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Debian's /usr/bin/chromium is a wrapper script; give the real binary when it is there.
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"].into_iter().find(|p| Path::new(p).exists());
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut options = json!({ "args": args });
        if let Some(binary) = binary {
            options["binary"] = json!(binary);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("start a Chromium session");
        Self { client, _driver: driver, profile }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("open the page");
    }

    /// Runs `body` (a function body that may `return`) in the page.
    pub async fn eval(&self, body: &str) -> Value {
        self.client.execute(body, vec![]).await.unwrap_or_else(|e| panic!("run {body:?} in the page: {e}"))
    }

    /// Polls the page every 100 ms until the JavaScript expression `cond` is
    /// true, at most [`PAGE_LIMIT`]; panics naming `what` (and the page's text) if not.
    pub async fn wait_until(&self, cond: &str, what: &str) {
        let deadline = Instant::now() + PAGE_LIMIT;
        let check = format!("try {{ return !!({cond}); }} catch (e) {{ return false; }}");
        loop {
            if self.eval(&check).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("return document.body.innerText").await;
                panic!("timed out waiting for {what}; the page shows:\n{}", text.as_str().unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an element matching `css` shows `text`.
    pub async fn wait_text(&self, css: &str, text: &str) {
        let cond = format!(
            "[...document.querySelectorAll({css})].some(e => e.innerText.includes({text}))",
            css = json!(css),
            text = json!(text)
        );
        self.wait_until(&cond, &format!("{css} to show {text:?}")).await;
    }

    /// Waits for a visible element matching `css` and clicks it.
    pub async fn click(&self, css: &str) {
        self.wait_until(&format!("document.querySelector({})?.offsetParent", json!(css)), css).await;
        self.client.find(Locator::Css(css)).await.expect(css).click().await.expect(css);
    }

    /// Replaces the value of the input matching `css` by typing `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        self.wait_until(&format!("document.querySelector({})?.offsetParent", json!(css)), css).await;
        let el = self.client.find(Locator::Css(css)).await.expect(css);
        el.clear().await.expect(css);
        el.send_keys(text).await.expect(css);
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session (Chromium exits); the driver is killed on drop.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A panicking test leaves its Chromium behind: kill the processes using this profile.
        let profile = self.profile.path().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            if String::from_utf8_lossy(&cmdline).contains(&profile) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}
