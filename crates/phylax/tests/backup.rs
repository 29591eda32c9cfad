//! `phylax backup` and `phylax restore` as an operator uses them, with the
//! standard `age` and `tar` tools on the other side: the archive decrypts
//! and unpacks with them; an archive altered in any way (a flipped byte, a
//! cut, a changed or missing file, another backup's manifest) is refused
//! with one line; a kill during a backup leaves no file that looks
//! complete; a restore never overwrites; a drill prints its timing.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{fails, ok, phylax, tool};
use std::path::Path;
use std::process::Command;

/// A tool the test uses when present (util-linux's `prlimit`).
fn tool_quiet(name: &str) -> Option<String> {
    let o = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn run(cmd: &str, args: &[&str], cwd: &Path) -> Vec<u8> {
    let o = Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Unpack an archive with the standard tools into `dir`; the entries in
/// their order.
fn unpack(age: &str, archive: &str, dir: &str, p: &Path) -> Vec<String> {
    run(
        age,
        &["-d", "-i", "id.txt", "-o", &format!("{dir}.tar"), archive],
        p,
    );
    std::fs::create_dir(p.join(dir)).unwrap();
    run("tar", &["-xf", &format!("../{dir}.tar")], &p.join(dir));
    String::from_utf8(run("tar", &["-tf", &format!("{dir}.tar")], p))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Pack `entries` of `dir` again (in that order) and encrypt to `to` with
/// the age tool, as anyone holding the public recipient can.
fn repack(age: &str, dir: &str, entries: &[String], to: &str, out: &str, p: &Path) {
    let mut args = vec!["-cf".to_owned(), format!("../{out}.tar")];
    args.extend(entries.iter().cloned());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run("tar", &a, &p.join(dir));
    run(age, &["-r", to, "-o", out, &format!("{out}.tar")], p);
}

fn verify(archive: &str, p: &Path) -> std::process::Output {
    phylax(&["backup", "verify", archive, "--identity", "id.txt"], p)
}

#[test]
fn backups_open_with_the_age_tool_and_refuse_every_alteration() {
    use std::os::unix::fs::PermissionsExt;
    let (Some(age), Some(keygen)) = (tool("age"), tool("age-keygen")) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    run(&keygen, &["-o", "id.txt"], p);
    let to = String::from_utf8(run(&keygen, &["-y", "id.txt"], p)).unwrap();
    let to = to.trim();
    let created: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &[
            "backup",
            "create",
            "--data-dir",
            "inst",
            "--recipient",
            to,
            "--out",
            "b1.age",
            "--json",
        ],
        p,
    )))
    .unwrap();
    assert_eq!(created["backup"]["recipients"], 1);
    let mode = std::fs::metadata(p.join("b1.age"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let v: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &[
            "backup",
            "verify",
            "b1.age",
            "--identity",
            "id.txt",
            "--json",
        ],
        p,
    )))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["backup_id"], created["backup"]["backup_id"]);
    // The signer checks out against the key `phylax audit key` prints.
    let key = ok(&phylax(&["audit", "key", "--data-dir", "inst"], p));
    let key = key.trim();
    ok(&phylax(
        &[
            "backup",
            "verify",
            "b1.age",
            "--identity",
            "id.txt",
            "--key",
            key,
        ],
        p,
    ));

    // The standard tools open it; the manifest comes last; neither the KEK
    // nor the TLS private key is inside.
    let entries = unpack(&age, "b1.age", "x", p);
    assert_eq!(entries.last().map(String::as_str), Some("manifest.sig"));
    assert!(entries.iter().any(|e| e == "db/phylax.db"), "{entries:?}");
    let kek = std::fs::read_to_string(p.join("inst-keys/kek")).unwrap();
    let kek = kek.lines().find(|l| !l.starts_with('#')).unwrap();
    let kek = kek.rsplit(':').next().unwrap();
    let plain = std::fs::read(p.join("x.tar")).unwrap();
    assert!(
        !plain.windows(kek.len()).any(|w| w == kek.as_bytes()),
        "the KEK is in the backup"
    );
    assert!(
        !plain.windows(11).any(|w| w == b"PRIVATE KEY"),
        "a private key is in the backup"
    );

    // Packed again unchanged, it verifies (so what follows fails for the
    // alteration, not the packing).
    repack(&age, "x", &entries, to, "same.age", p);
    ok(&verify("same.age", p));

    // A flipped byte and a cut are refused.
    let sealed = std::fs::read(p.join("b1.age")).unwrap();
    let mut flipped = sealed.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(p.join("flipped.age"), &flipped).unwrap();
    let e = fails(&verify("flipped.age", p));
    assert!(e.contains("damaged"), "{e}");
    std::fs::write(p.join("cut.age"), &sealed[..sealed.len() - 200]).unwrap();
    let e = fails(&verify("cut.age", p));
    assert!(e.contains("damaged") || e.contains("cut"), "{e}");

    // A file altered, or left out, after the manifest was signed.
    let config = std::fs::read_to_string(p.join("x/config/phylax.toml")).unwrap();
    std::fs::write(
        p.join("x/config/phylax.toml"),
        format!("{config}\n# edited\n"),
    )
    .unwrap();
    repack(&age, "x", &entries, to, "altered.age", p);
    let e = fails(&verify("altered.age", p));
    assert!(e.contains("config/phylax.toml was altered"), "{e}");
    std::fs::write(p.join("x/config/phylax.toml"), config).unwrap();
    let without: Vec<String> = entries
        .iter()
        .filter(|e| *e != "tls/ca.pem")
        .cloned()
        .collect();
    repack(&age, "x", &without, to, "missing.age", p);
    let e = fails(&verify("missing.age", p));
    assert!(e.contains("tls/ca.pem is missing"), "{e}");

    // A newer backup carrying the older one's (validly signed) manifest.
    ok(&phylax(
        &[
            "backup",
            "create",
            "--data-dir",
            "inst",
            "--recipient",
            to,
            "--out",
            "b2.age",
        ],
        p,
    ));
    let entries2 = unpack(&age, "b2.age", "y", p);
    for f in ["manifest.json", "manifest.sig"] {
        std::fs::copy(p.join("x").join(f), p.join("y").join(f)).unwrap();
    }
    repack(&age, "y", &entries2, to, "replayed.age", p);
    let e = fails(&verify("replayed.age", p));
    assert!(e.contains("altered") || e.contains("does not match"), "{e}");

    // An identity others can read is refused; so is a stranger's.
    std::fs::set_permissions(p.join("id.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = fails(&verify("b1.age", p));
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(p.join("id.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    run(&keygen, &["-o", "stranger.txt"], p);
    let e = fails(&phylax(
        &["backup", "verify", "b1.age", "--identity", "stranger.txt"],
        p,
    ));
    assert!(e.contains("not encrypted to this identity"), "{e}");

    // Restore: into a new place, never over one; the copy opens.
    let r = ok(&phylax(
        &[
            "restore",
            "--from",
            "b2.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "copy",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(
        r.contains("restored backup") && r.contains("signed by"),
        "{r}"
    );
    assert!(ok(&phylax(&["keys", "status", "--data-dir", "copy"], p)).contains("generation 1"));
    // The KEK is never taken from the archive: it must be named.
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "b2.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "copy3",
        ],
        p,
    ));
    assert!(e.contains("name the KEK"), "{e}");
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "b2.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "copy",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(e.contains("not empty"), "{e}");
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "altered.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "copy2",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(e.contains("altered"), "{e}");
    assert!(!p.join("copy2").exists());
    // Nothing of a refused restore is left beside the target.
    let stray: Vec<_> = std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("restoring"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // A drill prints its timing, and is in the instance's audit log.
    let out = ok(&phylax(
        &[
            "backup",
            "drill",
            "--data-dir",
            "inst",
            "--identity",
            "id.txt",
            "--from",
            "b2.age",
        ],
        p,
    ));
    println!("{out}");
    assert!(
        out.contains("restore drill PASSED") && out.contains("RTO"),
        "{out}"
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&phylax(
        &[
            "backup",
            "drill",
            "--data-dir",
            "inst",
            "--identity",
            "id.txt",
            "--from",
            "b2.age",
            "--json",
        ],
        p,
    )))
    .unwrap();
    assert_eq!(j["record"]["ok"], true);
    // A backup of another instance is refused by a drill unless told.
    ok(&phylax(&["init", "--data-dir", "other"], p));
    ok(&phylax(
        &[
            "backup",
            "create",
            "--data-dir",
            "other",
            "--recipient",
            to,
            "--out",
            "other.age",
        ],
        p,
    ));
    let e = fails(&phylax(
        &[
            "backup",
            "drill",
            "--data-dir",
            "inst",
            "--identity",
            "id.txt",
            "--from",
            "other.age",
        ],
        p,
    ));
    assert!(e.contains("not a key you trust"), "{e}");
    // Restored with this instance's KEK, another instance's archive (or
    // one forged: anyone can encrypt to the public recipient and sign
    // with a key of their own) is refused before anything is restored:
    // its signer is no checkpoint key this KEK holds.
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "other.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "forged",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(e.contains("belongs to"), "{e}");
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "other.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "forged",
            "--key-file",
            "inst-keys/kek",
            "--other-instance",
        ],
        p,
    ));
    assert!(e.contains("forged"), "{e}");
    assert!(!p.join("forged").exists());

    // Restoring where the TLS key is not (another machine): a new key is
    // made in a directory of its own, never through one planted beside
    // the target.
    let tls_key = p.join("inst-keys/inst-tls-server-key.pem");
    std::fs::rename(&tls_key, p.join("tls-key.away")).unwrap();
    std::fs::create_dir(p.join("moved-keys")).unwrap();
    std::fs::write(p.join("victim"), "keep me").unwrap();
    std::os::unix::fs::symlink(
        p.join("victim"),
        p.join("moved-keys/moved-tls-server-key.pem"),
    )
    .unwrap();
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "b2.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "moved",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(e.contains("moved-keys"), "{e}");
    assert_eq!(
        std::fs::read_to_string(p.join("victim")).unwrap(),
        "keep me"
    );
    assert!(!p.join("moved").exists());
    let r = ok(&phylax(
        &[
            "restore",
            "--from",
            "b2.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "moved2",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(r.contains("new local CA"), "{r}");
    let mode = std::fs::metadata(p.join("moved2-keys/moved2-tls-server-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::rename(p.join("tls-key.away"), &tls_key).unwrap();
}

#[test]
fn a_killed_backup_leaves_nothing_that_looks_complete() {
    let (Some(_), Some(keygen)) = (tool("age"), tool("age-keygen")) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(&phylax(&["init", "--data-dir", "inst"], p));
    run(&keygen, &["-o", "id.txt"], p);
    let to = String::from_utf8(run(&keygen, &["-y", "id.txt"], p)).unwrap();
    let backups = p.join("backups");
    std::fs::create_dir(&backups).unwrap();
    // SIGKILL at several moments: each time, the directory holds either
    // nothing named *.age or a backup that verifies.
    for delay_ms in [5u64, 20, 40, 80, 150, 300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phylax"))
            .args([
                "backup",
                "create",
                "--data-dir",
                "inst",
                "--recipient",
                to.trim(),
                "--out",
            ])
            .arg(&backups)
            .current_dir(p)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
    }
    for e in std::fs::read_dir(&backups).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".age") && !name.starts_with('.') {
            ok(&phylax(
                &[
                    "backup",
                    "verify",
                    e.path().to_str().unwrap(),
                    "--identity",
                    "id.txt",
                ],
                p,
            ));
        } else {
            // Left by a kill: hidden, never named like a backup.
            assert!(name.starts_with('.'), "{name}");
        }
    }
    // A full disk (here: a file-size limit, with the signal ignored as a
    // full disk's ENOSPC would be): reported in one line, nothing named
    // like a backup left, no partial file either.
    if let Some(prlimit) = tool_quiet("prlimit") {
        // The limit: below a backup's size, above its database copy's.
        ok(&phylax(
            &[
                "backup",
                "create",
                "--data-dir",
                "inst",
                "--recipient",
                to.trim(),
                "--out",
                "probe.age",
            ],
            p,
        ));
        let size = std::fs::metadata(p.join("probe.age")).unwrap().len();
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; exec {prlimit} --fsize={} {} backup create --data-dir inst --recipient {} --out full.age",
                size - 2048,
                env!("CARGO_BIN_EXE_phylax"),
                to.trim()
            ))
            .current_dir(p)
            .output()
            .unwrap();
        let e = fails(&o);
        assert!(
            e.contains("too large") || e.contains("full") || e.contains("disk I/O"),
            "{e}"
        );
        let left: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("full.age") || n.starts_with(".phylax-backup-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // And the newest complete one is what a drill picks.
    let e = fails(&phylax(
        &[
            "restore",
            "--from",
            "backups/none.age",
            "--identity",
            "id.txt",
            "--data-dir",
            "r",
            "--key-file",
            "inst-keys/kek",
        ],
        p,
    ));
    assert!(e.contains("none.age"), "{e}");
}
