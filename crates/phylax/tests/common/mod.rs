//! What the CLI test files share: running `phylax`, expecting success
//! or a one-line failure, finding the external tools a test needs.
#![allow(dead_code, clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

pub fn phylax(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phylax"))
        .args(args)
        .current_dir(cwd)
        .env_remove("PHYLAX_KEK")
        .env_remove("PHYLAX_DATABASE_URL")
        .output()
        .unwrap()
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A failure is one line on stderr starting with `error:`, and exit status 1.
pub fn fails(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = String::from_utf8(o.stderr.clone()).unwrap();
    assert!(e.starts_with("error: "), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one-line reason: {e}");
    e
}

/// The path of a tool the test needs; under CI its absence is a failure
/// (`.ci/run` installs it), elsewhere the test is skipped.
pub fn tool(name: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs `{name}` (Debian package age; .ci/run installs it)"
        );
        eprintln!("skipped: `{name}` is not installed (apt-get install age)");
    }
    found
}
