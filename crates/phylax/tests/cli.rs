//! The `phylax` binary as an operator uses it.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fails, ok, phylax, tool};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn help_lists_the_commands() {
    let d = tempfile::tempdir().unwrap();
    let h = ok(&phylax(&["--help"], d.path()));
    for c in ["quickstart", "init", "serve", "client", "user"] {
        assert!(h.contains(c), "{h}");
    }
    let h = ok(&phylax(&["client", "--help"], d.path()));
    for c in ["add", "list", "disable", "enable", "keygen", "assertion"] {
        assert!(h.contains(c), "{h}");
    }
    assert!(ok(&phylax(&["serve", "--help"], d.path())).contains("--danger-plaintext"));
}

#[test]
fn init_clients_and_errors() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    assert!(p.join("inst/tls/ca.pem").exists());
    let kek = p.join("inst-keys/kek");
    assert_eq!(
        std::fs::metadata(&kek).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(fails(&phylax(&["init", "--data-dir", "inst"], p)).contains("already"));
    assert!(fails(&phylax(
        &["init", "--data-dir", "x", "--key-file", "x/kek"],
        p
    ))
    .contains("outside"));

    ok(&phylax(&["client", "keygen", "--out", "c"], p));
    assert_eq!(
        std::fs::metadata(p.join("c/client-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(fails(&phylax(&["client", "keygen", "--out", "c"], p)).contains("must not exist"));
    let e = fails(&phylax(
        &[
            "client",
            "add",
            "--data-dir",
            "inst",
            "--name",
            "n",
            "--scope",
            "user/Patient.r",
            "--jwks",
            "c/client-jwks.json",
        ],
        p,
    ));
    assert!(e.contains("--scope"), "{e}");
    std::fs::write(
        p.join("priv.json"),
        r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA","d":"AA"}]}"#,
    )
    .unwrap();
    let e = fails(&phylax(
        &[
            "client",
            "add",
            "--data-dir",
            "inst",
            "--name",
            "n",
            "--scope",
            "system/*.rs",
            "--jwks",
            "priv.json",
        ],
        p,
    ));
    assert!(e.contains("private"), "{e}");
    let id = ok(&phylax(
        &[
            "client",
            "add",
            "--data-dir",
            "inst",
            "--name",
            "lab",
            "--scope",
            "system/Patient.rs system/Observation.read",
            "--jwks",
            "c/client-jwks.json",
        ],
        p,
    ));
    let id = id.trim();
    assert_eq!(id.len(), 36);
    let list = ok(&phylax(&["client", "list", "--data-dir", "inst"], p));
    assert!(
        list.contains(id)
            && list.contains("active")
            && list.contains("system/Observation.rs system/Patient.rs"),
        "{list}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["client", "list", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(json[0]["client_id"], id);
    ok(&phylax(&["client", "disable", "--data-dir", "inst", id], p));
    assert!(ok(&phylax(&["client", "list", "--data-dir", "inst"], p)).contains("disabled"));
    ok(&phylax(&["client", "enable", "--data-dir", "inst", id], p));
    assert!(fails(&phylax(
        &["client", "disable", "--data-dir", "inst", "nope"],
        p
    ))
    .contains("no client"));
    let a = ok(&phylax(
        &[
            "client",
            "assertion",
            "--client-id",
            id,
            "--key",
            "c/client-key.pem",
        ],
        p,
    ));
    assert_eq!(a.trim().split('.').count(), 3);

    assert!(fails(&phylax(&["serve", "--data-dir", "nowhere"], p)).contains("phylax init"));
    let e = fails(&phylax(
        &[
            "serve",
            "--data-dir",
            "inst",
            "--danger-plaintext",
            "--listen",
            "0.0.0.0:0",
        ],
        p,
    ));
    assert!(e.contains("loopback"), "{e}");
    let e = fails(&phylax(
        &[
            "client",
            "list",
            "--data-dir",
            "inst",
            "--database-url",
            "postgres://x@127.0.0.1:1/y",
        ],
        p,
    ));
    assert!(e.contains("SQLite"), "{e}");
    // The KEK can come from PHYLAX_KEK instead of the file (e.g. a secret
    // manager); a wrong one is refused before anything is served.
    let kek_text = std::fs::read_to_string(&kek).unwrap();
    let moved = p.join("elsewhere.kek");
    std::fs::rename(&kek, &moved).unwrap();
    assert!(fails(&phylax(&["client", "list", "--data-dir", "inst"], p)).contains("key file"));
    let with_env = |v: &str| {
        Command::new(env!("CARGO_BIN_EXE_phylax"))
            .args(["client", "list", "--data-dir", "inst"])
            .current_dir(p)
            .env("PHYLAX_KEK", v)
            .output()
            .unwrap()
    };
    assert!(ok(&with_env(kek_text.trim())).contains(id));
    let other = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    assert!(fails(&with_env(other)).contains("KEK does not match"));
    assert!(fails(&with_env("not-base64")).contains("malformed"));
    std::fs::rename(&moved, &kek).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(fails(&phylax(&["client", "list", "--data-dir", "inst"], p)).contains("chmod 600"));
}

/// `quickstart` creates an instance and serves HTTPS; run again, it reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_creates_then_reuses() {
    let d = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    for (round, expect) in [(0, "created a new"), (1, "reusing the")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phylax"))
            .args(["quickstart", "--listen", &listen])
            .current_dir(d.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        while !out.contains("Use it:") {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            out.push_str(&line);
        }
        assert!(out.contains(expect), "round {round}: {out}");
        // No core file would hold its keys.
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert_eq!(
            core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
            ["0", "0"],
            "{core}"
        );
        assert!(
            out.contains("tls/ca.pem") && out.contains("client add") && out.contains("auth/token"),
            "{out}"
        );
        let ca = std::fs::read(d.path().join("phylax-data/tls/ca.pem")).unwrap();
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let mut status = 0;
        for _ in 0..100 {
            if let Ok(r) = client
                .get(format!("https://{listen}/fhir/metadata"))
                .send()
                .await
            {
                status = r.status().as_u16();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "round {round}");
        // SIGHUP reloads the certificate; it does not stop the server.
        let hup = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "still running after SIGHUP"
        );
        let r = client
            .get(format!("https://{listen}/fhir/metadata"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // The keys are beside the data directory, not in it.
    assert!(d.path().join("phylax-data-keys/kek").exists());
    assert!(!d.path().join("phylax-data/kek").exists());
}

#[test]
fn users_and_apps() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    let add = |args: &[&str]| {
        let mut a = vec!["user", "add", "--data-dir", "inst"];
        a.extend_from_slice(args);
        phylax(&a, p)
    };
    let out = ok(&add(&["--username", "Dr.Grey", "--role", "clinician"]));
    assert!(out.contains("/auth/enroll?token="), "{out}");
    let link = out.lines().last().unwrap();
    assert!(
        link.starts_with("https://127.0.0.1:8443/auth/enroll?token="),
        "{link}"
    );
    assert!(fails(&add(&["--username", "dr.grey", "--role", "clinician"])).contains("taken"));
    assert!(fails(&add(&["--username", "x", "--role", "wizard"])).contains("unknown role"));
    assert!(fails(&add(&["--username", "pat", "--role", "patient"])).contains("--patient"));
    assert!(fails(&add(&["--username", "a b", "--role", "admin"])).contains("username"));
    ok(&add(&[
        "--username",
        "jane",
        "--role",
        "patient",
        "--patient",
        "p-1",
    ]));
    let list = ok(&phylax(&["user", "list", "--data-dir", "inst"], p));
    assert!(
        list.contains("dr.grey") && list.contains("not enrolled"),
        "{list}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["user", "list", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    let by_name = |n: &str| {
        json.as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == n)
            .unwrap()
            .clone()
    };
    let grey = by_name("dr.grey");
    assert_eq!(grey["mfa"], false);
    assert_eq!(grey["passkeys"], 0);
    assert_eq!(grey["enrollment_pending"], true);
    assert_eq!(by_name("jane")["role"], "patient");
    // The database holds neither the username nor the link's token.
    let mut db = std::fs::read(p.join("inst/phylax.db")).unwrap();
    if let Ok(wal) = std::fs::read(p.join("inst/phylax.db-wal")) {
        db.extend(wal);
    }
    assert!(db.len() > 10_000);
    let token = link.rsplit('.').next().unwrap();
    for needle in ["dr.grey", "Dr.Grey", "jane", token] {
        assert!(
            !db.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} in the database"
        );
    }
    let u =
        |cmd: &str, name: &str| phylax(&["user", cmd, "--data-dir", "inst", "--username", name], p);
    assert!(ok(&u("disable", "dr.grey")).contains("disabled"));
    assert!(fails(&u("unlock", "dr.grey")).contains("not locked"));
    assert!(ok(&u("enable", "dr.grey")).contains("active"));
    assert!(ok(&u("reset-mfa", "dr.grey")).contains("second factor removed"));
    assert!(ok(&u("reset-password", "dr.grey")).contains("/auth/enroll?token="));
    assert!(fails(&u("disable", "nobody")).contains("no user"));
    let set_role = |name: &str, role: &str| {
        phylax(
            &[
                "user",
                "set-role",
                "--data-dir",
                "inst",
                "--username",
                name,
                "--role",
                role,
            ],
            p,
        )
    };
    assert!(ok(&set_role("dr.grey", "admin")).contains("now admin"));
    assert!(fails(&set_role("dr.grey", "patient")).contains("--patient"));
    assert!(fails(&set_role("jane", "clinician")).contains("--patient"));
    assert!(fails(&set_role("dr.grey", "wizard")).contains("unknown role"));

    // Apps.
    let app = |args: &[&str]| {
        let mut a = vec!["client", "add", "--data-dir", "inst", "--name", "app"];
        a.extend_from_slice(args);
        phylax(&a, p)
    };
    let id = ok(&app(&[
        "--scope",
        "patient/*.rs launch/patient openid fhirUser offline_access",
        "--redirect-uri",
        "https://app.example/cb",
        "--redirect-uri",
        "http://127.0.0.1:7000/cb",
        "--public",
    ]));
    assert_eq!(id.trim().len(), 36);
    for (args, why) in [
        (
            vec![
                "--scope",
                "patient/*.rs",
                "--redirect-uri",
                "http://app.example/cb",
                "--public",
            ],
            "https",
        ),
        (
            vec![
                "--scope",
                "patient/*.rs",
                "--redirect-uri",
                "https://app.example/cb#x",
                "--public",
            ],
            "fragment",
        ),
        (
            vec![
                "--scope",
                "system/*.rs",
                "--redirect-uri",
                "https://app.example/cb",
                "--public",
            ],
            "--scope",
        ),
        (
            vec![
                "--scope",
                "patient/*.rs",
                "--redirect-uri",
                "https://app.example/cb",
            ],
            "--jwks",
        ),
        (vec!["--scope", "system/*.rs", "--public"], "--redirect-uri"),
        (
            vec![
                "--scope",
                "patient/*.rs",
                "--redirect-uri",
                "http://localhost.evil.example/cb",
                "--public",
            ],
            "https",
        ),
    ] {
        let e = fails(&app(&args));
        assert!(e.contains(why), "{args:?}: {e}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["client", "list", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(json[0]["public"], true);
    assert_eq!(json[0]["redirect_uris"][1], "http://127.0.0.1:7000/cb");
    let out = ok(&phylax(
        &["keys", "rotate-signing", "--data-dir", "inst"],
        p,
    ));
    assert!(out.contains("sig-2"), "{out}");
    let out = ok(&phylax(
        &["keys", "rotate-signing", "--data-dir", "inst"],
        p,
    ));
    assert!(out.contains("sig-3"), "{out}");
}

#[test]
fn audit_checkpoint_verify_and_tampering() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    // Administrative changes are audited.
    ok(&phylax(
        &[
            "user",
            "add",
            "--data-dir",
            "inst",
            "--username",
            "ann",
            "--role",
            "auditor",
        ],
        p,
    ));
    ok(&phylax(
        &["user", "disable", "--data-dir", "inst", "--username", "ann"],
        p,
    ));
    ok(&phylax(
        &["keys", "rotate-signing", "--data-dir", "inst"],
        p,
    ));
    let note = ok(&phylax(&["audit", "checkpoint", "--data-dir", "inst"], p));
    assert!(
        note.contains("\n3\n") && note.contains("\u{2014} phylax/"),
        "{note}"
    );
    std::fs::write(p.join("saved.cp"), &note).unwrap();
    let key = ok(&phylax(&["audit", "key", "--data-dir", "inst"], p));
    assert!(
        key.starts_with("phylax/") && key.matches('+').count() >= 2,
        "{key}"
    );
    let out = ok(&phylax(
        &[
            "audit",
            "verify",
            "--data-dir",
            "inst",
            "--checkpoint",
            "saved.cp",
            "--json",
        ],
        p,
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["sealed"].as_u64()),
        (Some(true), Some(3))
    );
    assert_eq!(v["outside_checkpoints"], 1);
    // Nothing is old enough to prune; the pruning pass is recorded anyway.
    let pruned = ok(&phylax(&["audit", "prune", "--data-dir", "inst"], p));
    assert!(
        pruned.starts_with("0 audit records older than 2190 days"),
        "{pruned}"
    );
    // Someone with the database file edits a record.
    let db = rusqlite::Connection::open(p.join("inst/phylax.db")).unwrap();
    assert!(
        db.execute(
            "UPDATE audit_log SET agent = 'x' WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 0)",
            []
        )
        .is_err(),
        "the append-only guard refuses edits"
    );
    assert!(db.execute("DELETE FROM audit_log", []).is_err());
    assert!(
        db.execute("UPDATE audit_leaf SET audit_id = audit_id + 1", [])
            .is_err(),
        "and changes of tree positions"
    );
    assert!(db.execute("DELETE FROM audit_leaf", []).is_err());
    assert!(
        db.execute("UPDATE audit_checkpoints SET frontier = NULL", [])
            .is_err(),
        "and edits of checkpoints (and the tree edge they keep)"
    );
    db.execute_batch(
        "DROP TRIGGER audit_no_update; UPDATE audit_log SET recorded = recorded + 1 \
         WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 1)",
    )
    .unwrap();
    let e = fails(&phylax(&["audit", "verify", "--data-dir", "inst"], p));
    assert!(e.contains("FAILED") && e.contains("position 1"), "{e}");
    // A truncated log is caught by the saved checkpoint even if the
    // database's own checkpoints were removed with it.
    db.execute_batch(
        "UPDATE audit_log SET recorded = recorded - 1 \
         WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 1); \
         DROP TRIGGER audit_no_delete; DROP TRIGGER audit_leaf_no_delete; \
         DROP TRIGGER checkpoints_no_delete; \
         DELETE FROM audit_log WHERE id = (SELECT audit_id FROM audit_leaf WHERE leaf_index = 2); \
         DELETE FROM audit_leaf WHERE leaf_index = 2; DELETE FROM audit_checkpoints WHERE size = 3;",
    )
    .unwrap();
    let e = fails(&phylax(&["audit", "verify", "--data-dir", "inst"], p));
    assert!(e.contains("no checkpoint covers"), "{e}");
    let e = fails(&phylax(
        &[
            "audit",
            "verify",
            "--data-dir",
            "inst",
            "--checkpoint",
            "saved.cp",
        ],
        p,
    ));
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn access_explain_review_and_break_glass_queue() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    let run = |args: &[&str]| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--data-dir", "inst"]);
        phylax(&a, p)
    };
    ok(&run(&[
        "user",
        "add",
        "--username",
        "dr.a",
        "--role",
        "clinician",
        "--practitioner",
        "pr-a",
    ]));
    ok(&run(&[
        "user",
        "add",
        "--username",
        "aud",
        "--role",
        "auditor",
    ]));
    assert!(fails(&run(&[
        "user",
        "add",
        "--username",
        "pat",
        "--role",
        "patient",
        "--patient",
        "p1",
        "--practitioner",
        "pr-a",
    ]))
    .contains("Practitioner"));
    assert!(fails(&run(&[
        "user",
        "set-practitioner",
        "--username",
        "dr.a",
        "--practitioner",
        "not an id!"
    ]))
    .contains("Practitioner"));
    ok(&run(&[
        "user",
        "set-practitioner",
        "--username",
        "dr.a",
        "--practitioner",
        "pr-b",
    ]));

    let out = ok(&run(&[
        "access",
        "explain",
        "--user",
        "aud",
        "--resource",
        "Patient/p1",
    ]));
    assert!(out.contains("DENIED: role"), "{out}");
    let out = ok(&run(&[
        "access",
        "explain",
        "--user",
        "dr.a",
        "--resource",
        "Patient/p1",
    ]));
    assert!(out.contains("reach: 0 patient(s)"), "{out}");
    assert!(out.contains("DENIED: resource: not found"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(&run(&[
        "access",
        "explain",
        "--user",
        "dr.a",
        "--resource",
        "Patient/p1",
        "--interaction",
        "delete",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["allowed"], false);
    assert!(fails(&run(&[
        "access",
        "explain",
        "--user",
        "dr.a",
        "--resource",
        "p1"
    ]))
    .contains("Type/id"));
    assert!(fails(&run(&[
        "access",
        "explain",
        "--client",
        "nope",
        "--resource",
        "Patient/p1"
    ]))
    .contains("no such user or client"));
    assert!(fails(&run(&[
        "access",
        "explain",
        "--user",
        "dr.a",
        "--resource",
        "Patient/p1",
        "--interaction",
        "dance"
    ]))
    .contains("--interaction"));

    let table = ok(&run(&["access", "review"]));
    assert!(
        table.contains("dr.a") && table.contains("clinician") && table.contains("never"),
        "{table}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&ok(&run(&["access", "review", "--json"]))).unwrap();
    let a = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "dr.a")
        .unwrap();
    assert_eq!(a["mfa"], false);
    assert_eq!(a["unused"], "cruds");
    // A clinician does not change who reaches whom.
    assert_eq!(a["relationships"], false);

    // Nothing held on an instance this release created; approving a
    // resource that is not held is refused with its reason.
    assert!(ok(&run(&["access", "held"])).contains("no relationship data is held"));
    assert_eq!(ok(&run(&["access", "held", "--json"])).trim(), "[]");
    assert!(
        fails(&run(&["access", "approve", "--resource", "CareTeam/ct-1"]))
            .contains("no held version of CareTeam/ct-1")
    );
    assert!(fails(&run(&["access", "approve", "--resource", "ct-1"])).contains("Type/id"));
    assert!(ok(&run(&["access", "approve", "--all"])).contains("0 held version(s) approved"));
    assert!(ok(&run(&["access", "break-glass", "list"])).contains("no grants waiting"));
    assert!(fails(&run(&[
        "access",
        "break-glass",
        "close",
        "--id",
        "x",
        "--reviewer",
        "dr.a",
        "--note",
        "ok"
    ]))
    .contains("auditor"));
    assert!(fails(&run(&[
        "access",
        "break-glass",
        "close",
        "--id",
        "x",
        "--reviewer",
        "aud",
        "--note",
        "ok"
    ]))
    .contains("no open"));
    // Every one of those was recorded, and the log still verifies.
    ok(&run(&["audit", "verify"]));
}

/// `keys status|rotate`, `patient erase|hold|holds` and `config check`
/// as an operator runs them (the work itself is tested in the server's
/// `tests/it/keys.rs`).
#[test]
fn keys_patients_and_config_check() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    let st: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["keys", "status", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(st["kek"][0]["generation"], 1);
    assert_eq!(st["kek"][0]["provider"], "file");
    assert_eq!(st["max_age_days"], 365);
    let kinds: Vec<&str> = st["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    for k in ["tokens", "cursors", "sign-in", "index", "checkpoint"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    assert!(ok(&phylax(&["keys", "status", "--data-dir", "inst"], p))
        .contains("generation 1 (current)"));
    // Naming nothing to rotate is an error, not a no-op.
    fails(&phylax(&["keys", "rotate", "--data-dir", "inst"], p));
    // A rate limit applies to the data keys only, and is a count (0: no
    // limit).
    let e = fails(&phylax(
        &[
            "keys",
            "rotate",
            "--tokens",
            "--max-rate",
            "100",
            "--data-dir",
            "inst",
        ],
        p,
    ));
    assert!(e.contains("--max-rate applies to --data-keys"), "{e}");
    let o = phylax(
        &[
            "keys",
            "rotate",
            "--data-keys",
            "--max-rate",
            "-5",
            "--data-dir",
            "inst",
        ],
        p,
    );
    assert_eq!(o.status.code(), Some(2), "a usage error");
    let r: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["keys", "rotate", "--kek", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(r["kek"]["to"], 2);
    assert_eq!(r["kek"]["retired"], serde_json::json!([1]));
    let key = std::fs::read_to_string(p.join("inst-keys/kek")).unwrap();
    let gens: Vec<&str> = key.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(gens.len() == 1 && gens[0].starts_with("2:"), "{key}");
    assert!(key.contains("# owner: "), "the key file names its instance");
    // Still opens, with the rotated key file.
    assert!(ok(&phylax(&["keys", "status", "--data-dir", "inst"], p))
        .contains("generation 2 (current)"));
    // The search index key: a new generation, the first one retired.
    let r: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["keys", "rotate", "--index", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(r["index"]["key"], "mac:blind-index@2", "{r}");
    assert_eq!(
        r["index"]["retired"],
        serde_json::json!(["mac:blind-index"])
    );

    // The sign-in key: a new generation, usernames re-hashed; the first
    // generation is kept while an unused enrollment link depends on it.
    ok(&phylax(
        &[
            "user",
            "add",
            "--username",
            "dr.k",
            "--role",
            "clinician",
            "--data-dir",
            "inst",
        ],
        p,
    ));
    let r: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &[
            "keys",
            "rotate",
            "--sign-in",
            "--data-dir",
            "inst",
            "--json",
        ],
        p,
    )))
    .unwrap();
    assert_eq!(r["sign_in"]["generation"], 2, "{r}");
    assert_eq!(r["sign_in"]["usernames_rehashed"], 1, "{r}");
    assert_eq!(r["sign_in"]["retire"]["kept"][0]["generation"], 1, "{r}");
    assert_eq!(
        r["sign_in"]["retire"]["kept"][0]["enrollment_links"], 1,
        "{r}"
    );
    let out = ok(&phylax(&["keys", "retire", "--data-dir", "inst"], p));
    assert!(
        out.contains("generation 1 kept") && out.contains("1 enrollment links"),
        "{out}"
    );
    let r: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &["keys", "retire", "--data-dir", "inst", "--json"],
        p,
    )))
    .unwrap();
    assert_eq!(r["sign_in"]["retired"], serde_json::json!([]), "{r}");
    assert!(ok(&phylax(&["keys", "status", "--data-dir", "inst"], p)).contains("mac:auth@2"));
    // The user is still found by name.
    ok(&phylax(
        &[
            "user",
            "disable",
            "--username",
            "dr.k",
            "--data-dir",
            "inst",
        ],
        p,
    ));

    // A copy of the instance (a restored backup used as staging) still
    // names the original's key file: its rotation would destroy the
    // original's KEK, so it is refused, and the original keeps working.
    let copy = p.join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["phylax.toml", "phylax.db"] {
        std::fs::copy(p.join("inst").join(f), copy.join(f)).unwrap();
    }
    let e = fails(&phylax(
        &["keys", "rotate", "--kek", "--data-dir", "copy"],
        p,
    ));
    assert!(e.contains("belongs to the instance in"), "{e}");
    assert!(ok(&phylax(&["keys", "status", "--data-dir", "inst"], p))
        .contains("generation 2 (current)"));

    // Erasure: a patient with no data, an id that is no id, a missing reason.
    let e = fails(&phylax(
        &[
            "patient",
            "erase",
            "--data-dir",
            "inst",
            "--id",
            "nobody",
            "--reason",
            "GDPR",
        ],
        p,
    ));
    assert!(e.contains("no data"), "{e}");
    let e = fails(&phylax(
        &[
            "patient",
            "erase",
            "--data-dir",
            "inst",
            "--id",
            "a/b",
            "--reason",
            "GDPR",
        ],
        p,
    ));
    assert!(e.contains("patient id"), "{e}");
    ok(&phylax(
        &[
            "patient",
            "hold",
            "--data-dir",
            "inst",
            "--id",
            "p1",
            "--reason",
            "litigation",
        ],
        p,
    ));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ok(&phylax(
            &["patient", "holds", "--data-dir", "inst", "--json"],
            p
        )))
        .unwrap(),
        serde_json::json!(["p1"])
    );
    let e = fails(&phylax(
        &[
            "patient",
            "erase",
            "--data-dir",
            "inst",
            "--id",
            "p1",
            "--reason",
            "GDPR",
        ],
        p,
    ));
    assert!(e.contains("legal hold"), "{e}");
    ok(&phylax(
        &[
            "patient",
            "hold",
            "--data-dir",
            "inst",
            "--id",
            "p1",
            "--reason",
            "closed",
            "--release",
        ],
        p,
    ));
    assert!(ok(&phylax(&["patient", "holds", "--data-dir", "inst"], p)).contains("no patient"));

    // Config check: clean; then a PIN pasted into phylax.toml, a key file
    // others can read.
    assert!(ok(&phylax(&["config", "check", "--data-dir", "inst"], p)).contains("ok"));
    let cfg = p.join("inst/phylax.toml");
    let clean = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{clean}\n[hsm]\npin = \"123456\"\n")).unwrap();
    let o = phylax(&["config", "check", "--data-dir", "inst", "--json"], p);
    let e = fails(&o);
    assert!(e.contains("1 problem"), "{e}");
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(f[0]["setting"], "hsm.pin");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("123456"),
        "the secret is not echoed"
    );
    std::fs::write(&cfg, &clean).unwrap();
    std::fs::set_permissions(
        p.join("inst-keys/kek"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = phylax(&["config", "check", "--data-dir", "inst"], p);
    fails(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("key_file"));
}

#[test]
fn the_kek_escrows_to_age_custodians_and_comes_back_with_the_age_tool() {
    use std::os::unix::fs::PermissionsExt;
    let (Some(age), Some(keygen)) = (tool("age"), tool("age-keygen")) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    let mut public = Vec::new();
    for id in ["alice.txt", "bob.txt"] {
        let o = Command::new(&keygen)
            .args(["-o", id])
            .current_dir(p)
            .output()
            .unwrap();
        assert!(o.status.success());
        let o = Command::new(&keygen)
            .args(["-y", id])
            .current_dir(p)
            .output()
            .unwrap();
        public.push(String::from_utf8(o.stdout).unwrap().trim().to_owned());
    }
    std::fs::write(p.join("custodians"), format!("# Bob\n{}\n", public[1])).unwrap();
    let out: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &[
            "keys",
            "escrow",
            "--data-dir",
            "inst",
            "--recipient",
            &public[0],
            "--recipients-file",
            "custodians",
            "--out",
            "kek.age",
            "--json",
        ],
        p,
    )))
    .unwrap();
    assert_eq!(out["escrow"]["generations"], serde_json::json!([1]));
    assert_eq!(out["escrow"]["recipients"], 2);
    let mode = std::fs::metadata(p.join("kek.age"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Each refusal is one line, and leaves nothing behind.
    let refused = |recipient: &str, out: &str| {
        fails(&phylax(
            &[
                "keys",
                "escrow",
                "--data-dir",
                "inst",
                "--recipient",
                recipient,
                "--out",
                out,
            ],
            p,
        ))
    };
    // Never over an existing file; a recipient that is not one is named.
    let e = refused(&public[0], "kek.age");
    assert!(e.contains("exists"), "{e}");
    let e = refused("age1nope", "x.age");
    assert!(e.contains("recipient 1"), "{e}");
    assert!(!p.join("x.age").exists());
    let e = refused(&public[0], "inst/kek.age");
    assert!(e.contains("inside the data directory"), "{e}");
    assert!(!p.join("inst/kek.age").exists());
    // Not through a dangling symbolic link either; nothing left behind.
    std::os::unix::fs::symlink(p.join("inst/leak.age"), p.join("dangling.age")).unwrap();
    let e = refused(&public[0], "dangling.age");
    assert!(e.contains("exists"), "{e}");
    assert!(!p.join("inst/leak.age").exists() && !p.join(".dangling.age.partial").exists());
    // A low-order point is a bad recipient, said in one line.
    let e = refused(
        "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq5cu47z",
        "low.age",
    );
    assert!(e.contains("low-order"), "{e}");
    // Either custodian alone recovers the KEK with the standard tool, and
    // the instance opens with what came back.
    let kek = p.join("inst-keys/kek");
    let original = std::fs::read(&kek).unwrap();
    std::fs::rename(&kek, p.join("kek.lost")).unwrap();
    for id in ["alice.txt", "bob.txt"] {
        let o = Command::new(&age)
            .args(["-d", "-i", id, "kek.age"])
            .current_dir(p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(!original.is_empty() && !o.stdout.is_empty());
        let _ = std::fs::remove_file(&kek);
        std::fs::write(&kek, &o.stdout).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ok(&phylax(&["keys", "status", "--data-dir", "inst"], p))
            .contains("generation 1 (current)"));
    }
    // The escrowed file itself holds nothing readable.
    let sealed = std::fs::read(p.join("kek.age")).unwrap();
    let line = String::from_utf8(original).unwrap();
    let b64 = line.lines().find(|l| !l.starts_with('#')).unwrap();
    let b64 = b64.rsplit(':').next().unwrap();
    assert!(!sealed.windows(b64.len()).any(|w| w == b64.as_bytes()));
}

#[test]
fn incidents_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    let i = |args: &[&str]| {
        let mut a = vec!["incident", args[0], "--data-dir", "inst"];
        a.extend_from_slice(&args[1..]);
        phylax(&a, p)
    };
    let out = ok(&i(&[
        "open",
        "--title",
        "suspicious export",
        "--discovered",
        "2026-12-07T09:30:00Z",
        "--severity",
        "critical",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["discovered"], "2026-12-07T09:30:00.000Z");
    // Bad input: one line, status 1, nothing written.
    assert!(fails(&i(&["open", "--title", "x", "--discovered", "yesterday"])).contains("RFC 3339"));
    assert!(fails(&i(&["open", "--title", "x", "--severity", "huge"])).contains("severity"));
    assert!(fails(&i(&["open", "--title", "  "])).contains("empty"));
    assert!(fails(&i(&["note", "--incident", "inc-1", "--text", "x"])).contains("inc-"));
    assert!(fails(&i(&[
        "note",
        "--incident",
        "inc-20261207-000000",
        "--text",
        "x"
    ]))
    .contains("no incident"));
    ok(&i(&["note", "--incident", &id, "--text", "vendor called"]));
    let shown = ok(&i(&["show", "--incident", &id]));
    assert!(
        shown.contains("vendor called") && shown.contains("critical"),
        "{shown}"
    );
    let list = ok(&i(&["list", "--json"]));
    let l: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 1);
    // Scope: exactly one kind of principal.
    assert!(fails(&i(&["scope", "--incident", &id])).contains("give one of"));
    assert!(fails(&i(&[
        "scope",
        "--incident",
        &id,
        "--user",
        "u",
        "--client",
        "c"
    ]))
    .contains("give one of"));
    assert!(fails(&i(&["scope", "--incident", &id, "--ip", "nope"])).contains("--ip"));
    let s = ok(&i(&[
        "scope",
        "--incident",
        &id,
        "--all-principals",
        "--json",
    ]));
    let s: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["records"], 0, "no FHIR traffic yet");
    assert_eq!(s["principal"], "all principals");
    let csv = ok(&i(&["scope", "--incident", &id, "--client", "x", "--csv"]));
    assert!(csv.starts_with("kind,reference,read,"), "{csv}");
    // The report of that (empty) scope: the clocks run from discovery.
    let md = ok(&i(&[
        "report",
        "--incident",
        &id,
        "--jurisdiction",
        "us-hipaa,eu-gdpr",
    ]));
    assert!(md.contains("2026-12-10T09:30:00.000Z"), "GDPR 72 h: {md}");
    assert!(md.contains("| (unknown) | 0 |"), "{md}");
    let j = ok(&i(&["report", "--incident", &id, "--format", "json"]));
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["individuals"], 0);
    assert!(
        ok(&i(&["report", "--incident", &id, "--format", "html"])).starts_with("<!DOCTYPE html>")
    );
    assert!(
        fails(&i(&["report", "--incident", &id, "--jurisdiction", "mars"]))
            .contains("jurisdiction")
    );
    assert!(fails(&i(&["report", "--incident", &id, "--format", "pdf"])).contains("--format"));
    assert!(
        fails(&i(&["report", "--incident", &id, "--letters-out", "l.age"])).contains("--contact")
    );
    // Containment of an address (no key rotation asked).
    let c = ok(&i(&[
        "contain",
        "--incident",
        &id,
        "--ip",
        "203.0.113.7",
        "--keep-token-keys",
        "--json",
    ]));
    let c: serde_json::Value = serde_json::from_str(&c).unwrap();
    assert_eq!(c["actions"].as_array().unwrap().len(), 1, "{c}");
    assert!(fails(&i(&["contain", "--incident", &id, "--keep-token-keys"])).contains("nothing"));
    ok(&i(&["unblock", "--ip", "203.0.113.7"]));
    ok(&i(&[
        "close",
        "--incident",
        &id,
        "--resolution",
        "no PHI left",
    ]));
    assert!(fails(&i(&["note", "--incident", &id, "--text", "late"])).contains("closed"));
    // Every step is in the audit log, which still verifies.
    ok(&phylax(&["audit", "verify", "--data-dir", "inst"], p));
}
