//! `kiln build start --wait`: one progress line per cloud until the build ends.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_protocol::BuildId;
use kiln_protocol::api::Build;

use super::Client;

const POLL: Duration = Duration::from_millis(500);

/// Polls the build until it has ended and returns its final state.
pub async fn until_done(client: &Client, id: BuildId) -> anyhow::Result<Build> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let tty = console_is_tty();
    let style = ProgressStyle::with_template("{spinner} {prefix:<16} {msg} [{elapsed}]").expect("static template");
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let build: Build = client.get(&format!("/v1/builds/{id}")).await?;
        for t in &build.targets {
            let line = match &t.error {
                Some(e) => {
                    format!("{} at {}: {}", t.status.as_str(), e.step.as_str(), e.message.lines().next().unwrap_or(""))
                }
                None => format!("{} ({})", t.status.as_str(), t.step.as_str()),
            };
            let key = t.cloud.to_string();
            if tty {
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new_spinner().with_style(style.clone()).with_prefix(key.clone()));
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                bar.set_message(line.clone());
                if t.status.is_terminal() && !bar.is_finished() {
                    bar.finish_with_message(line);
                }
            } else if last.get(&key) != Some(&line) {
                eprintln!("{key}: {line}");
                last.insert(key, line);
            }
        }
        if build.status.is_terminal() {
            return Ok(build);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
