//! The live status page of a running `serve`, loaded in a real headless Chromium: after one round it must
//! show the current round (2), the completed round in its table and the loss/ε chart; `/api/status` and
//! Prometheus `/metrics` must agree with what the devices did.
//!
//! Chromium is a system package (`.ci/run` installs Debian's `chromium` and sets STARLING_REQUIRE_BROWSER=1,
//! which makes a missing browser a failure). Without it, and without that variable, the browser part is
//! skipped with a notice; the HTTP checks always run.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{connect_both, delta, http_get, next_task, upload_for, Coord, Serving};
use starling_protocol::ManifestVerifier;

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STARLING_CHROMIUM") {
        return Some(p.into());
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The page's DOM after its scripts ran, as headless Chromium renders it.
fn rendered_dom(browser: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_page_shows_the_current_round_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::init(&tmp.path().join("coord"), &common::config(2, ""));
    let tokens = [coord.enrol("alpha"), coord.enrol("beta")];
    let serving = Serving::start(&coord, None);
    let http = serving.http.expect("serve reports its status page");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Round 1 done by both devices; both then take their round-2 tasks, so round 2 is open, 0 of 2 in.
    let sessions = rt.block_on(async {
        let sessions = connect_both(&serving, Some(&tokens)).await;
        let key = coord.signing_key;
        let mut verifiers = [
            ManifestVerifier::new(vec![key]),
            ManifestVerifier::new(vec![key]),
        ];
        for round in 1..=2u64 {
            let [v0, v1] = &mut verifiers;
            let (a, b) = tokio::join!(next_task(&sessions[0], v0), next_task(&sessions[1], v1));
            for (i, (task, m)) in [a, b].into_iter().enumerate() {
                assert_eq!(task.round.0, round);
                if round == 1 {
                    let (u, body) = upload_for(i, &task, &m, &delta(i, 1, coord.params));
                    sessions[i].upload(u, &body).await.unwrap();
                }
            }
        }
        sessions
    });

    let (code, body) = http_get(http, "/api/status");
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["current_round"]["id"], 2);
    assert_eq!(st["current_round"]["phase"], "collecting");
    assert_eq!(st["current_round"]["updates"], 0);
    assert_eq!(st["latest_version"], 1);
    assert_eq!(st["rounds"][0]["updates"], 2);
    assert_eq!(st["clients"]["active"], 2);

    // `status` cannot open the locked store while serve runs: it reads the live page instead.
    let live = coord.status();
    assert_eq!(live["current_round"]["id"], 2);
    assert_eq!(live["rounds_completed"], 1);

    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "starling_updates_total{outcome=\"accepted\"} 2",
        "starling_tasks_offered_total 4",
        "starling_current_round 2",
        "starling_model_version 1",
        "starling_rounds_completed 1",
        "starling_clients{status=\"active\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing in:\n{metrics}"
        );
    }
    assert_eq!(http_get(http, "/nope").0, 404);

    match chromium() {
        Some(browser) => {
            let dom = rendered_dom(&browser, &format!("http://{http}/"));
            assert!(
                dom.contains("data-loaded=\"true\""),
                "the page's script did not render:\n{dom}"
            );
            assert!(
                dom.contains("id=\"current-round\">2<"),
                "current round not shown:\n{dom}"
            );
            assert!(dom.contains("id=\"latest-version\">v1<"), "{dom}");
            assert!(
                dom.contains("<polyline id=\"loss-line\""),
                "no loss chart:\n{dom}"
            );
            assert!(
                dom.contains("alpha") && dom.contains("beta"),
                "clients not listed:\n{dom}"
            );
        }
        None if std::env::var_os("STARLING_REQUIRE_BROWSER").is_some() => {
            panic!("STARLING_REQUIRE_BROWSER is set but no chromium was found")
        }
        None => eprintln!("status page browser check skipped: no chromium (apt install chromium)"),
    }

    // Round 2 completes and serve exits by itself.
    rt.block_on(async {
        let key = coord.signing_key;
        for (i, s) in sessions.iter().enumerate() {
            let (task, m) = next_task(s, &mut ManifestVerifier::new(vec![key])).await;
            let (u, body) = upload_for(i, &task, &m, &delta(i, 2, coord.params));
            s.upload(u, &body).await.unwrap();
        }
    });
    assert!(serving.wait_exit());
}
