//! `phylax incident open|list|show|note|close|scope`: the breach register
//! and the scope of an incident from the audit log
//! (docs/INCIDENT_RESPONSE.md).

use crate::{app_state, instant, InstanceArgs};
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use phylax_server::data::incidents::{Incident, IncidentId, Severity, Step};
use phylax_server::ops::incident::{self as response, scope};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum IncidentCmd {
    /// Open an incident; prints its id.
    Open {
        #[command(flatten)]
        inst: InstanceArgs,
        /// A short title (sealed in the register; may name what happened).
        #[arg(long)]
        title: String,
        /// When the organisation became aware of it (RFC 3339, e.g.
        /// 2026-12-07T09:30:00Z); default now. The legal clocks run from
        /// here.
        #[arg(long)]
        discovered: Option<String>,
        /// low, moderate, high or critical.
        #[arg(long, default_value = "high")]
        severity: String,
        #[arg(long)]
        json: bool,
    },
    /// The breach register: every incident, newest last.
    List {
        #[command(flatten)]
        inst: InstanceArgs,
        /// Only incidents not closed.
        #[arg(long)]
        open: bool,
        #[arg(long)]
        json: bool,
    },
    /// One incident with every step.
    Show {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        incident: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a note to an open incident.
    Note {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        incident: String,
        #[arg(long)]
        text: String,
    },
    /// Close an incident (it stays in the register).
    Close {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        incident: String,
        /// What was found and done.
        #[arg(long)]
        resolution: String,
    },
    /// Which patients and resources a principal read, searched, wrote,
    /// exported or was refused, from the verified audit log; recorded in
    /// the incident.
    Scope(ScopeArgs),
    /// Stop principals everywhere at once: disable users (password and
    /// second factors cleared, sessions and tokens revoked) and clients,
    /// block addresses, rotate the token and signing keys (and, if asked,
    /// the data keys). Effective on every node within seconds.
    Contain(ContainArgs),
    /// The notification report: deadlines per regime from the discovery
    /// time and the latest scope, counts by state, the HIPAA risk
    /// assessment; with --letters-out, one letter per affected patient in
    /// an age-encrypted archive.
    Report(ReportArgs),
    /// A scripted breach against the running instance: a drill client
    /// scrapes synthetic patients, the detector opens an incident, scope
    /// and containment run; prints the timeline (time to detect, to
    /// scope, to contain) and records the result. Exit 1 if any step
    /// failed.
    Drill {
        #[command(flatten)]
        inst: InstanceArgs,
        /// The serving node to attack; default the configured public URL.
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Lift an address block.
    Unblock {
        #[command(flatten)]
        inst: InstanceArgs,
        #[arg(long)]
        ip: String,
    },
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    inst: InstanceArgs,
    #[arg(long)]
    incident: String,
    /// Comma-separated: us-hipaa, eu-gdpr, ca-pipeda, us-ca-ccpa.
    #[arg(long, default_value = "us-hipaa", value_delimiter = ',')]
    jurisdiction: Vec<String>,
    /// md, json or html.
    #[arg(long, default_value = "md")]
    format: String,
    /// Write the patients' letters to this new file (tar inside age).
    #[arg(long)]
    letters_out: Option<PathBuf>,
    /// An age recipient who may open the letters; repeatable.
    #[arg(long = "recipient", value_name = "AGE_RECIPIENT")]
    recipients: Vec<String>,
    /// A file of age recipients, one per line.
    #[arg(long)]
    recipients_file: Option<PathBuf>,
    /// Whom patients contact, printed in each letter (the organisation's
    /// phone number or address).
    #[arg(long)]
    contact: Option<String>,
}

#[derive(Args, Debug)]
pub struct ContainArgs {
    #[command(flatten)]
    inst: InstanceArgs,
    #[arg(long)]
    incident: String,
    /// A user account id (as the scope names it, `user:` optional);
    /// repeatable.
    #[arg(long = "user")]
    users: Vec<String>,
    /// An OAuth client id; repeatable.
    #[arg(long = "client")]
    clients: Vec<String>,
    /// An IP address to block on every route; repeatable.
    #[arg(long = "ip")]
    ips: Vec<String>,
    /// Leave the access-token and signing keys as they are (they are
    /// rotated by default).
    #[arg(long)]
    keep_token_keys: bool,
    /// Also rotate the data keys and re-encrypt everything under new ones
    /// (when sealed data or keys may have left; progress bar).
    #[arg(long)]
    rotate_data_keys: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ScopeArgs {
    #[command(flatten)]
    inst: InstanceArgs,
    #[arg(long)]
    incident: String,
    /// A user account id.
    #[arg(long)]
    user: Option<String>,
    /// An OAuth client id (what it did, and what users did through it).
    #[arg(long)]
    client: Option<String>,
    /// A grant family (one sign-in session and its refresh chain).
    #[arg(long)]
    token_family: Option<String>,
    /// An IP address.
    #[arg(long)]
    ip: Option<String>,
    /// Every principal.
    #[arg(long)]
    all_principals: bool,
    /// From this time (RFC 3339), inclusive.
    #[arg(long)]
    since: Option<String>,
    /// Until this time (RFC 3339), exclusive.
    #[arg(long)]
    until: Option<String>,
    /// More checkpoints saved outside the database (`[audit]
    /// checkpoint_file` is read anyway); repeatable.
    #[arg(long = "checkpoint")]
    checkpoints: Vec<PathBuf>,
    /// The whole scope as JSON.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// One line per patient and resource touched, as CSV.
    #[arg(long)]
    csv: bool,
}

/// An RFC 3339 time as ms.
fn time(s: &str, what: &str) -> Result<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| anyhow!("{what}: not an RFC 3339 time (e.g. 2026-12-07T09:30:00Z)"))
}

fn incident_id(s: &str) -> Result<IncidentId> {
    s.parse().map_err(|e| anyhow!("--incident: {e}"))
}

fn who() -> String {
    format!("uid {}", phylax_server::keys::os_uid())
}

pub async fn incident_cmd(c: IncidentCmd) -> Result<()> {
    match c {
        IncidentCmd::Open {
            inst,
            title,
            discovered,
            severity,
            json,
        } => {
            let severity: Severity = severity.parse().map_err(|e| anyhow!("--severity: {e}"))?;
            let discovered = match discovered {
                Some(d) => time(&d, "--discovered")?,
                None => chrono::Utc::now().timestamp_millis(),
            };
            let st = app_state(&inst).await?;
            let inc = response::open(&st, &title, severity, discovered, &who()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": inc.id, "opened": instant(inc.opened), "discovered": instant(inc.discovered)})
                );
            } else {
                println!("{}", inc.id);
            }
            Ok(())
        }
        IncidentCmd::List { inst, open, json } => {
            let st = app_state(&inst).await?;
            let all: Vec<Incident> = response::read(&st, None)
                .await?
                .into_iter()
                .filter(|i| !open || i.is_open())
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no incidents");
            } else {
                for i in &all {
                    println!(
                        "{}  {:8}  {}  discovered {}  {}",
                        i.id,
                        i.severity.as_str(),
                        match i.closed {
                            Some(t) => format!("closed {}", instant(t)),
                            None => "open".into(),
                        },
                        instant(i.discovered),
                        i.title
                    );
                }
            }
            Ok(())
        }
        IncidentCmd::Show {
            inst,
            incident,
            json,
        } => {
            let id = incident_id(&incident)?;
            let st = app_state(&inst).await?;
            let inc = response::read(&st, Some(&id))
                .await?
                .pop()
                .ok_or_else(|| anyhow!("no incident {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inc)?);
            } else {
                print_incident(&inc);
            }
            Ok(())
        }
        IncidentCmd::Note {
            inst,
            incident,
            text,
        } => {
            let id = incident_id(&incident)?;
            let st = app_state(&inst).await?;
            response::step(&st, &id, Step::Note { text, by: who() }).await?;
            println!("noted in {id}");
            Ok(())
        }
        IncidentCmd::Close {
            inst,
            incident,
            resolution,
        } => {
            let id = incident_id(&incident)?;
            let st = app_state(&inst).await?;
            response::step(
                &st,
                &id,
                Step::Closed {
                    by: who(),
                    resolution,
                },
            )
            .await?;
            println!("closed {id}");
            Ok(())
        }
        IncidentCmd::Scope(a) => scope_cmd(a).await,
        IncidentCmd::Contain(a) => contain_cmd(a).await,
        IncidentCmd::Report(a) => report_cmd(a).await,
        IncidentCmd::Drill { inst, url, json } => drill_cmd(inst, url, json).await,
        IncidentCmd::Unblock { inst, ip } => {
            let ip: std::net::IpAddr =
                ip.parse().map_err(|_| anyhow!("--ip: not an IP address"))?;
            let st = app_state(&inst).await?;
            st.blocks
                .unblock(ip, chrono::Utc::now().timestamp_millis())
                .await?;
            st.audit
                .record_admin(
                    "incident",
                    phylax_audit::event::Action::Update,
                    format!("address {ip} unblocked by {}", who()),
                )
                .await
                .map_err(|e| anyhow!("not recorded in the audit log: {e}"))?;
            println!("{ip} unblocked; every node lets it in again within seconds");
            Ok(())
        }
    }
}

fn print_incident(i: &Incident) {
    println!("{}: {}", i.id, i.title);
    println!(
        "severity {}; discovered {}; opened {}; {}",
        i.severity.as_str(),
        instant(i.discovered),
        instant(i.opened),
        match i.closed {
            Some(t) => format!("closed {}", instant(t)),
            None => "open".into(),
        }
    );
    for (at, s) in &i.steps {
        let line = match s {
            Step::Opened { by, .. } => format!("opened by {by}"),
            Step::Note { text, by } => format!("note by {by}: {text}"),
            Step::Alert { rule, key, detail } => format!("alert {rule} ({key}): {detail}"),
            Step::Scoped { by, scope } => format!(
                "scope of {} by {by}: {} records, {} individuals",
                scope["principal"].as_str().unwrap_or("?"),
                scope["records"],
                scope["individuals"]
            ),
            Step::Contained { by, actions } => {
                format!("contained by {by}: {}", actions.join("; "))
            }
            Step::Reported {
                by,
                jurisdictions,
                individuals,
                letters,
            } => format!(
                "report by {by} ({}): {individuals} individuals, {letters} letters",
                jurisdictions.join(", ")
            ),
            Step::Closed { by, resolution } => format!("closed by {by}: {resolution}"),
        };
        println!("  {}  {line}", instant(*at));
    }
}

async fn scope_cmd(a: ScopeArgs) -> Result<()> {
    let id = incident_id(&a.incident)?;
    let principal = match (&a.user, &a.client, &a.token_family, &a.ip, a.all_principals) {
        (Some(u), None, None, None, false) => scope::Who::User(u.clone()),
        (None, Some(c), None, None, false) => scope::Who::Client(c.clone()),
        (None, None, Some(f), None, false) => scope::Who::Family(f.clone()),
        (None, None, None, Some(ip), false) => {
            scope::Who::Ip(ip.parse().map_err(|_| anyhow!("--ip: not an IP address"))?)
        }
        (None, None, None, None, true) => scope::Who::All,
        _ => anyhow::bail!("give one of --user, --client, --token-family, --ip, --all-principals"),
    };
    let w = scope::Window {
        since: a.since.as_deref().map(|s| time(s, "--since")).transpose()?,
        until: a.until.as_deref().map(|s| time(s, "--until")).transpose()?,
    };
    let mut outside = Vec::new();
    for p in &a.checkpoints {
        outside.push(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
    }
    let st = app_state(&a.inst).await?;
    if let Some(f) = &st.config.audit.checkpoint_file {
        if let Ok(n) = std::fs::read_to_string(st.data_dir.join(f)) {
            outside.push(n);
        }
    }
    let s = response::scope(&st, &id, &principal, w, &outside, &who()).await?;
    if s.log.outside_checkpoints == 0 {
        eprintln!(
            "warning: no checkpoint kept outside the database was checked; a log cut back together with its checkpoints shows only against an earlier scope. Set [audit] checkpoint_file, or give --checkpoint FILE"
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else if a.csv {
        print_csv(&s);
    } else {
        print_scope(&s);
    }
    Ok(())
}

fn print_scope(s: &scope::Scope) {
    println!(
        "scope of {} ({} to {}), from an audit log of {} records that verified (checkpoint {})",
        s.principal,
        s.since.as_deref().unwrap_or("the beginning"),
        s.until.as_deref().unwrap_or("now"),
        s.log.records,
        s.log
            .checkpoint_size
            .map_or("none".into(), |n| n.to_string())
    );
    let t = &s.totals;
    println!(
        "{} records: {} read, {} search, {} write, {} export, {} other, {} denied, {} failed",
        s.records, t.read, t.search, t.write, t.export, t.other, t.denied, t.failed
    );
    println!("{} distinct individuals", s.individuals);
    for (k, n) in &s.by_interaction {
        println!("  interaction {k}: {n}");
    }
    for (k, n) in &s.by_type {
        println!("  type {k}: {n}");
    }
    if !s.restricted.is_empty() {
        println!("restricted (labels or VIP): {}", s.restricted.join(", "));
    }
    if !s.principals.is_empty() {
        println!(
            "principals: {}",
            s.principals.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    println!("patients:");
    for (p, t) in &s.patients {
        println!(
            "  Patient/{p}  read {} search {} write {} export {}  {} .. {}{}",
            t.counts.read,
            t.counts.search,
            t.counts.write,
            t.counts.export,
            t.first,
            t.last,
            if t.restricted { "  RESTRICTED" } else { "" }
        );
    }
}

fn print_csv(s: &scope::Scope) {
    println!("kind,reference,read,search,write,export,other,first,last,restricted");
    let rows = s
        .patients
        .iter()
        .map(|(p, t)| ("patient", format!("Patient/{p}"), t))
        .chain(s.resources.iter().map(|(r, t)| ("resource", r.clone(), t)));
    for (kind, r, t) in rows {
        // Ids and references are [A-Za-z0-9.-] and "/": nothing to quote.
        println!(
            "{kind},{r},{},{},{},{},{},{},{},{}",
            t.counts.read,
            t.counts.search,
            t.counts.write,
            t.counts.export,
            t.counts.other,
            t.first,
            t.last,
            t.restricted
        );
    }
}

async fn contain_cmd(a: ContainArgs) -> Result<()> {
    use phylax_server::instance::Instance;
    use phylax_server::keys::KeyAdmin;
    let id = incident_id(&a.incident)?;
    let mut addresses = Vec::new();
    for ip in &a.ips {
        addresses.push(
            ip.parse()
                .map_err(|_| anyhow!("--ip {ip}: not an IP address"))?,
        );
    }
    let plan = response::contain::Plan {
        users: a
            .users
            .iter()
            .map(|u| u.strip_prefix("user:").unwrap_or(u).to_owned())
            .collect(),
        clients: a.clients.clone(),
        addresses,
        rotate_tokens: !a.keep_token_keys,
        rotate_data_keys: a.rotate_data_keys,
    };
    // Key rotation works on the instance's raw store (the key
    // administration); the rest on the server's state over it.
    let inst = Instance::open(&a.inst.data_dir, a.inst.database_url.as_deref()).await?;
    let admin = KeyAdmin::of(&inst, std::time::Duration::from_secs(3));
    let st = app_state(&a.inst).await?;
    let pb = if a.rotate_data_keys {
        crate::keys::progress_bar("re-encrypting")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let r = response::contain::contain(
        &st,
        Some(&admin),
        &id,
        &plan,
        &who(),
        &crate::keys::on_progress(&pb),
    )
    .await;
    pb.finish_and_clear();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for (t, what) in &r.actions {
            println!("{t}  {what}");
        }
        println!(
            "contained in {:.1} s; every node applies it within seconds",
            r.seconds
        );
    }
    Ok(())
}

async fn report_cmd(a: ReportArgs) -> Result<()> {
    use phylax_server::ops::incident::{deadlines::Jurisdiction, report};
    let id = incident_id(&a.incident)?;
    let regimes = a
        .jurisdiction
        .iter()
        .map(|j| j.trim().parse::<Jurisdiction>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("--jurisdiction: {e}"))?;
    if !matches!(a.format.as_str(), "md" | "json" | "html") {
        anyhow::bail!("--format: md, json or html");
    }
    let to = match &a.letters_out {
        Some(_) => {
            if a.contact.as_deref().is_none_or(|c| c.trim().is_empty()) {
                anyhow::bail!("--letters-out needs --contact (whom patients call or write to)");
            }
            let r =
                crate::keys::recipients_from(a.recipients.clone(), a.recipients_file.as_deref())?;
            Some(r)
        }
        None => None,
    };
    let st = app_state(&a.inst).await?;
    let letters = match (&a.letters_out, &to) {
        (Some(out), Some(to)) => Some(report::Letters {
            out,
            to,
            contact: a.contact.as_deref().unwrap_or_default(),
        }),
        _ => None,
    };
    let r = report::report(&st, &id, &regimes, letters, &who()).await?;
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&r)?),
        "html" => println!("{}", report::html(&r)),
        _ => print!("{}", report::markdown(&r)),
    }
    Ok(())
}

async fn drill_cmd(inst: InstanceArgs, url: Option<String>, json: bool) -> Result<()> {
    use phylax_server::instance::Instance;
    let i = Instance::open(&inst.data_dir, inst.database_url.as_deref()).await?;
    let ca = std::fs::read(i.ca_path())
        .with_context(|| format!("cannot read the instance CA {}", i.ca_path().display()))?;
    let url = url.unwrap_or_else(|| i.config.public_url.clone());
    let url = url.trim_end_matches('/').to_owned();
    let st = phylax_server::state::AppState::new(i)
        .await
        .map_err(|e| anyhow!("{}", crate::failure_line(e)))?;
    let r = response::drill::drill(&st, &url, &ca, &who()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for (t, what) in &r.timeline {
            println!("{t:7.1} s  {what}");
        }
        let secs = |t: Option<f64>| t.map_or("-".to_owned(), |t| format!("{t:.1} s"));
        println!(
            "time to detect {}, to scope {}, to contain {}",
            secs(r.time_to_detect_secs),
            secs(r.time_to_scope_secs),
            secs(r.time_to_contain_secs)
        );
    }
    match &r.failure {
        None => Ok(()),
        Some(f) => anyhow::bail!("the incident drill failed: {f}"),
    }
}
