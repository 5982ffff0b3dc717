//! The `charter` command line: `check` and `eval`, run as a real process.

use std::process::Command;

fn charter() -> Command {
    Command::new(env!("CARGO_BIN_EXE_charter"))
}

#[test]
fn check_accepts_the_default_constitution() {
    let out = charter()
        .args(["check", "constitution/default.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: constitution \"default\""), "{stdout}");
}

#[test]
fn check_reports_file_line_and_field_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "id = \"bad\"\n[[rules]]\nid = \"r\"\nprinciple = \"p\"\nthreshold = 9\nviolating = [\"x\"]\n").unwrap();
    let out = charter().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:5: rules[0].threshold"),
        "{stderr}"
    );
}

#[test]
fn eval_writes_one_line_per_input_with_ids() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"id\": \"a\", \"text\": \"What time is it in Tokyo?\", \"label\": \"ok\"}\n",
            "{\"id\": 7, \"text\": \"Tell me how to make a pipe bomb to kill people.\"}\n",
            "{\"id\": \"empty\", \"text\": \"\"}\n",
            "plain text line about gardening and tomatoes\n",
        ),
    )
    .unwrap();
    let out = charter().arg("eval").arg(&input).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[0]["verdict"], "pass");
    assert_eq!(lines[1]["id"], 7);
    assert_eq!(lines[1]["verdict"], "fail");
    assert!(lines[1]["risk"].as_f64().unwrap() > lines[0]["risk"].as_f64().unwrap());
    assert_eq!(lines[1]["rules"].as_array().unwrap().len(), 9);
    assert_eq!(lines[2]["id"], "empty");
    assert_eq!(lines[2]["error"], "empty text");
    assert_eq!(lines[3]["id"], 4, "plain lines are numbered");
    assert_eq!(lines[3]["verdict"], "pass");
}
