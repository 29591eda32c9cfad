//! `phylax config check`: is the configuration sound, and does it keep
//! secrets out (docs/KEYS.md, "Memory and secrets")?

use anyhow::{bail, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Check phylax.toml: every setting within bounds, no secret in it
    /// (PINs, passwords, keys, URLs with passwords), and every file that
    /// holds a secret present and readable by its owner only. Exits 1 on
    /// any error.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn config_cmd(c: ConfigCmd) -> Result<()> {
    match c {
        ConfigCmd::Check { data_dir, json } => {
            let findings = phylax_server::base::config::secrets::check(&data_dir);
            let errors = findings.iter().filter(|f| f.severity == "error").count();
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    println!("{}: {}: {}", f.severity, f.setting, f.message);
                }
                if findings.is_empty() {
                    println!(
                        "ok: no secret in {}, secret files are 0600",
                        phylax_server::base::config::CONFIG_FILE
                    );
                }
            }
            if errors > 0 {
                bail!("{errors} problem(s) in the configuration");
            }
            Ok(())
        }
    }
}
