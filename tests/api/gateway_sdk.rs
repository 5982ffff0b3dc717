//! The real Anthropic SDKs against the gateway: the Python `anthropic` package at 0.64.0
//! and 2.14.0 and the TypeScript `@anthropic-ai/sdk` 1.14.0, installed by
//! `tests/sdk/setup.sh` (run by `make setup-test`). Each runs its script in tests/sdk/
//! (create, stream with get_final_message / finalMessage, count_tokens, models, a blocked
//! prompt, a blocked output, a revised output, a mid-stream block, 429, 529 and a
//! mid-stream error, the next turn after each outcome, each with a user's assertions);
//! this test then checks what the mock upstream saw, e.g. that the SDK's own retries
//! reached it and the gateway added none, and that every next turn reached it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::anthropic_mock as mock;
use crate::gateway::{harness, test_id, FLAG_CLIENT_KEY, PIPE_BOMB_PROMPT};

/// Runs one SDK script against the shared gateway; returns its output, panicking (with
/// the output) when it fails.
async fn run_script(program: &Path, script: &Path, test: &str) -> String {
    assert!(
        program.exists(),
        "{} is missing: run `make setup-test` (tests/sdk/setup.sh) first",
        program.display()
    );
    let h = harness();
    let mut command = tokio::process::Command::new(program);
    command
        .arg(script)
        .current_dir(script.parent().unwrap())
        .env("GATEWAY_URL", format!("http://{}", h.addr))
        .env("TEST_ID", test)
        .env("REFUSAL", &h.refusal)
        .env("PLAIN_TEXT", mock::PLAIN_TEXT)
        .env("RICH_TEXT", mock::RICH_TEXT)
        .env("REVISION_TEXT", mock::REVISION_TEXT)
        .env("PIPE_BOMB_PROMPT", PIPE_BOMB_PROMPT)
        .env("FLAG_KEY", FLAG_CLIENT_KEY)
        // The SDKs must talk to the gateway only.
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("the SDK script finished within 10 minutes")
        .expect("the SDK script started");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "SDK script failed:\n{text}");
    text
}

/// What the mock saw from one SDK run.
fn check_upstream(test: &str) {
    let m = &harness().mock;
    let scenario = |s: &str| m.requests(&format!("{test}-{s}"));

    let create = scenario("create");
    assert_eq!(create.len(), 1);
    let body = create[0].json();
    assert_eq!(
        body["charter_test_unknown"],
        serde_json::json!({"kept": true})
    );
    assert_eq!(body["model"], "mock-plain");
    let key = create[0]
        .header("x-api-key")
        .or_else(|| create[0].header("authorization"))
        .unwrap();
    assert!(
        key.ends_with("sk-sdk-client"),
        "the client's key is forwarded"
    );
    assert!(create[0].header("anthropic-version").is_some());

    assert!(
        scenario("blocked-prompt").is_empty(),
        "a refused prompt never reaches upstream"
    );
    assert_eq!(scenario("revised").len(), 3, "answer, critique, revision");
    for outcome in ["pass", "flag", "block", "block-late", "revise"] {
        let turns = scenario(&format!("turns-{outcome}"));
        let next: Vec<_> = turns
            .iter()
            .filter(|r| {
                r.json()["messages"]
                    .as_array()
                    .is_some_and(|m| m.len() == 3)
            })
            .collect();
        assert_eq!(next.len(), 2, "{outcome}: both next turns reached upstream");
    }
    assert_eq!(
        scenario("midstream-error").len(),
        1,
        "stream errors are not retried"
    );
    for s in ["429", "529"] {
        let got = scenario(s);
        assert_eq!(got.len(), 3, "{s}: one try and the SDK's 2 retries");
        let retry_counts: Vec<Option<String>> = got
            .iter()
            .map(|r| r.header("x-stainless-retry-count"))
            .collect();
        assert_eq!(
            retry_counts,
            [Some("0".into()), Some("1".into()), Some("2".into())],
            "{s}: the retries are the SDK's own"
        );
    }
    let models = scenario("models");
    let paths: Vec<&str> = models.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/models?limit=1",
            "/v1/models?limit=1&after_id=claude-mock-1",
            "/v1/models/claude-mock-2"
        ]
    );
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

async fn python_sdk(version: &str) {
    let test = test_id(&format!("py{version}"));
    let dir = sdk_dir();
    let python = dir.join(format!(".venv/anthropic-{version}/bin/python"));
    let out = run_script(&python, &dir.join("client.py"), &test).await;
    assert!(out.contains(&format!("anthropic {version}")), "{out}");
    assert_eq!(passed(&out), 12, "{out}");
    check_upstream(&test);
}

#[tokio::test]
async fn python_sdk_0_64() {
    python_sdk("0.64.0").await;
}

#[tokio::test]
async fn python_sdk_2_x() {
    python_sdk("2.14.0").await;
}

#[tokio::test]
async fn typescript_sdk_1_x() {
    let test = test_id("ts");
    let dir = sdk_dir().join("js");
    let node = which("node").expect("node on PATH (Node 20)");
    let out = run_script(&node, &dir.join("client.mjs"), &test).await;
    assert!(out.contains("@anthropic-ai/sdk 1."), "{out}");
    assert_eq!(passed(&out), 12, "{out}");
    check_upstream(&test);
}

/// Scenarios the script reported as passed.
fn passed(output: &str) -> usize {
    output.lines().filter(|l| l.starts_with("ok ")).count()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}
