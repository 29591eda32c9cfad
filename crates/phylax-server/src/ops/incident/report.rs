//! `phylax incident report`: the notification obligations of an incident
//! (deadlines from its discovery time and its latest scope), the HIPAA
//! four-factor risk assessment with the facts Phylax knows filled in,
//! counts by state computed here from the patients' addresses (no
//! address leaves the server), and, if asked, one letter per affected
//! patient in an age-encrypted archive.
//!
//! The report itself holds counts and legal text only, no patient: it can
//! go to counsel and regulators as it is. The letters hold the minimum a
//! notice needs (name, postal address, what happened and when, what was
//! touched, whom to contact) and exist only inside the archive.

use super::deadlines::{self, Jurisdiction, Obligation};
use super::{audited, ResponseError};
use crate::data::incidents::{Incident, IncidentError, IncidentId, Step};
use crate::state::AppState;
use phylax_audit::event::Action;
use phylax_crypto::kek::Recipients;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Where letters go.
#[derive(Debug)]
pub struct Letters<'a> {
    /// The archive to write (must not exist).
    pub out: &'a Path,
    pub to: &'a Recipients,
    /// Whom patients contact (a phone number, an address): the
    /// organisation's, never a patient's.
    pub contact: &'a str,
}

/// The HIPAA risk assessment (45 CFR 164.402(2)): each factor with what
/// the audit log shows; the conclusion is the privacy officer's.
#[derive(Debug, Clone, Serialize)]
pub struct RiskAssessment {
    pub nature_and_extent: String,
    pub unauthorized_person: String,
    pub acquired_or_viewed: String,
    pub mitigation: String,
    pub conclusion: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub incident: String,
    pub title: String,
    pub severity: String,
    pub discovered: String,
    pub generated: String,
    pub principal: String,
    pub window: String,
    pub individuals: u64,
    pub records: u64,
    pub restricted: u64,
    /// Individuals per state or province of their address.
    pub by_state: BTreeMap<String, u64>,
    /// Individuals whose record gives no state (or no longer exists).
    pub state_unknown: u64,
    pub obligations: Vec<Obligation>,
    pub risk_assessment: RiskAssessment,
    pub containment: Vec<String>,
    /// Letters written into the archive.
    pub letters: u64,
}

/// Build the report of `id` for `regimes` (and write letters).
pub async fn report(
    st: &AppState,
    id: &IncidentId,
    regimes: &[Jurisdiction],
    letters: Option<Letters<'_>>,
    by: &str,
) -> Result<Report, ResponseError> {
    let inc = st.incidents.get(id).await?;
    let scope = inc.latest_scope().cloned().ok_or_else(|| {
        IncidentError::Invalid(format!(
            "incident {id} has no scope yet: run `phylax incident scope` first"
        ))
    })?;
    let patients: Vec<String> = scope["patients"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    if let Some(l) = &letters {
        if l.out.symlink_metadata().is_ok() {
            return Err(IncidentError::Invalid(format!(
                "{} exists; letters go to a new file",
                l.out.display()
            ))
            .into());
        }
    }
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    let mut unknown = 0u64;
    let mut sheets = Vec::new();
    for p in &patients {
        let a = crate::access::notify::addressee(&st.gate, p)
            .await
            .map_err(|e| IncidentError::Unavailable(e.to_string()))?;
        match a.as_ref().and_then(|a| a.state.as_deref()).map(state_code) {
            Some(s) => *by_state.entry(s).or_default() += 1,
            None => unknown += 1,
        }
        if let (Some(l), Some(a)) = (&letters, a) {
            sheets.push((p.clone(), letter(&inc, &scope, p, &a, l.contact)));
        }
    }
    let written = match &letters {
        Some(l) => write_letters(l, &sheets)?,
        None => 0,
    };
    let individuals = patients.len() as u64;
    let obligations = deadlines::obligations(
        &deadlines::Facts {
            discovered: inc.discovered,
            individuals,
            by_state: by_state.clone(),
        },
        regimes,
    );
    let containment = contained(&inc);
    let r = Report {
        incident: id.to_string(),
        title: inc.title.clone(),
        severity: inc.severity.as_str().into(),
        discovered: crate::base::clock::format_instant(inc.discovered),
        generated: crate::base::clock::format_instant(crate::base::clock::now_ms()),
        principal: scope["principal"].as_str().unwrap_or_default().into(),
        window: format!(
            "{} to {}",
            scope["since"]
                .as_str()
                .unwrap_or("the beginning of the log"),
            scope["until"]
                .as_str()
                .unwrap_or(scope["computed"].as_str().unwrap_or("now"))
        ),
        individuals,
        records: scope["records"].as_u64().unwrap_or(0),
        restricted: scope["restricted"].as_array().map_or(0, |a| a.len() as u64),
        by_state,
        state_unknown: unknown,
        risk_assessment: assess(&scope, &containment),
        obligations,
        containment,
        letters: written,
    };
    let stepped = st
        .incidents
        .append(
            id,
            Step::Reported {
                by: by.to_owned(),
                jurisdictions: regimes
                    .iter()
                    .map(|j| {
                        serde_json::to_value(j)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    })
                    .collect(),
                individuals,
                letters: written,
            },
            crate::base::clock::now_ms(),
        )
        .await?;
    audited(
        st,
        Action::Execute,
        format!(
            "incident {id} step {}: report ({individuals} individuals, {written} letters)",
            stepped.last_step()
        ),
    )
    .await?;
    Ok(r)
}

/// A state or province as the report may show it: a code of two or
/// three letters (US Core's USPS codes, Canadian provinces), or
/// `AA-BBB` (ISO 3166-2). Anything else (a whole address typed into the
/// field, a name) is counted as `(other)`: free text from a record never
/// reaches the report.
fn state_code(s: &str) -> String {
    let s = s.trim().to_ascii_uppercase();
    let code = |p: &str| (2..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric());
    let ok = match s.split_once('-') {
        Some((c, sub)) => c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) && code(sub),
        None => code(&s) && s.bytes().all(|b| b.is_ascii_alphabetic()),
    };
    if ok {
        s
    } else {
        "(other)".into()
    }
}

fn contained(inc: &Incident) -> Vec<String> {
    inc.steps
        .iter()
        .filter_map(|(_, s)| match s {
            Step::Contained { actions, .. } => Some(actions.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn assess(scope: &Value, containment: &[String]) -> RiskAssessment {
    let t = &scope["totals"];
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    let types: Vec<String> = scope["by_type"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} ({v})")).collect())
        .unwrap_or_default();
    RiskAssessment {
        nature_and_extent: format!(
            "{} individuals; record types touched: {}; {} records with restricted labels (sensitive categories or VIP)",
            scope["individuals"],
            if types.is_empty() { "none recorded".into() } else { types.join(", ") },
            scope["restricted"].as_array().map_or(0, Vec::len)
        ),
        unauthorized_person: format!(
            "{} (principals seen: {})",
            scope["principal"].as_str().unwrap_or_default(),
            scope["principals"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        ),
        acquired_or_viewed: format!(
            "returned to the principal: {} reads, {} searches, {} exports; written: {}; refused: {}",
            n("read"),
            n("search"),
            n("export"),
            n("write"),
            n("denied")
        ),
        mitigation: if containment.is_empty() {
            "no containment recorded yet".into()
        } else {
            containment.join("; ")
        },
        conclusion: "to be completed by the privacy officer: the probability that the PHI has been compromised, and whether notification is owed".into(),
    }
}

/// One patient's letter (plain text).
fn letter(
    inc: &Incident,
    scope: &Value,
    patient: &str,
    a: &crate::access::notify::Addressee,
    contact: &str,
) -> String {
    let touch = &scope["patients"][patient];
    let c = &touch["counts"];
    let mut kinds = Vec::new();
    for (k, what) in [
        ("read", "viewed"),
        ("search", "returned by searches"),
        ("export", "exported"),
        ("write", "changed"),
    ] {
        if c[k].as_u64().unwrap_or(0) > 0 {
            kinds.push(what);
        }
    }
    let mut out = String::new();
    out.push_str(&a.name);
    out.push('\n');
    for l in &a.lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nNotice of a data security incident (reference {})\n\n\
         On {} we learned that an unauthorized party may have had access to \
         health information we hold about you. Our records show that parts of \
         your record were {} between {} and {}.\n\n\
         We have stopped the access and are reviewing what happened. \
         If you have questions, contact us: {contact}\n",
        inc.id,
        &crate::base::clock::format_instant(inc.discovered)[..10],
        if kinds.is_empty() {
            "accessed".to_owned()
        } else {
            kinds.join(", ")
        },
        touch["first"]
            .as_str()
            .map_or("", |s| s.get(..10).unwrap_or(s)),
        touch["last"]
            .as_str()
            .map_or("", |s| s.get(..10).unwrap_or(s)),
    ));
    out
}

/// The letters as `letters/NNNNN.txt` plus `index.csv` (letter, patient
/// id) in a tar sealed with age, written under a temporary name and
/// renamed when complete.
fn write_letters(l: &Letters<'_>, sheets: &[(String, String)]) -> Result<u64, ResponseError> {
    let io = |e: std::io::Error| IncidentError::Unavailable(format!("writing the letters: {e}"));
    let dir = l
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".letters-{}", uuid::Uuid::new_v4().simple()));
    let r = write_sealed(l, sheets, &tmp).and_then(|()| {
        // A link does not replace an existing file: a letters archive is
        // never overwritten.
        std::fs::hard_link(&tmp, l.out)?;
        std::fs::File::open(dir)?.sync_all()
    });
    let _ = std::fs::remove_file(&tmp);
    r.map_err(io)?;
    Ok(sheets.len() as u64)
}

fn write_sealed(l: &Letters<'_>, sheets: &[(String, String)], tmp: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    let sealing = phylax_crypto::archive::seal(l.to, file)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tar = tar::Builder::new(sealing);
    let mut index = String::from("letter,patient\n");
    let add = |tar: &mut tar::Builder<_>, name: &str, body: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        tar.append_data(&mut h, name, body)
    };
    for (i, (p, text)) in sheets.iter().enumerate() {
        let name = format!("letters/{:05}.txt", i + 1);
        add(&mut tar, &name, text.as_bytes())?;
        index.push_str(&format!("{name},{p}\n"));
    }
    add(&mut tar, "index.csv", index.as_bytes())?;
    let mut f = tar.into_inner()?.finish()?;
    f.flush()?;
    f.sync_all()
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut o = format!(
        "# Incident {}: notification report\n\n{} (severity {})\n\n\
         - discovered: {}\n- generated: {}\n- principal: {}\n- window: {}\n\
         - individuals affected: {}\n- audit records: {}\n- records with restricted labels: {}\n\n",
        r.incident,
        r.title,
        r.severity,
        r.discovered,
        r.generated,
        r.principal,
        r.window,
        r.individuals,
        r.records,
        r.restricted
    );
    o.push_str("## Individuals by state or province\n\n| state | individuals |\n|---|---:|\n");
    for (s, n) in &r.by_state {
        o.push_str(&format!("| {s} | {n} |\n"));
    }
    o.push_str(&format!("| (unknown) | {} |\n\n", r.state_unknown));
    o.push_str("## Obligations\n\n| regime | notify | owed | due | standard | reference |\n|---|---|---|---|---|---|\n");
    for ob in &r.obligations {
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            serde_json::to_value(ob.jurisdiction)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            ob.notify,
            if ob.owed { "yes" } else { "no" },
            ob.due.as_deref().unwrap_or("-"),
            ob.when,
            ob.reference
        ));
    }
    let ra = &r.risk_assessment;
    o.push_str(&format!(
        "\n## Risk assessment (45 CFR 164.402(2))\n\n\
         1. Nature and extent of the PHI: {}\n\
         2. The unauthorized person: {}\n\
         3. Acquired or viewed: {}\n\
         4. Mitigation: {}\n\n\
         Conclusion: {}\n",
        ra.nature_and_extent,
        ra.unauthorized_person,
        ra.acquired_or_viewed,
        ra.mitigation,
        ra.conclusion
    ));
    if r.letters > 0 {
        o.push_str(&format!(
            "\n{} letters written (encrypted archive).\n",
            r.letters
        ));
    }
    o
}

/// The report as an HTML page (escaped by the template).
pub fn html(r: &Report) -> String {
    use maud::{html, DOCTYPE};
    let ra = &r.risk_assessment;
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Incident " (r.incident) } }
            body {
                h1 { "Incident " (r.incident) ": notification report" }
                p { (r.title) " (severity " (r.severity) ")" }
                ul {
                    li { "discovered: " (r.discovered) }
                    li { "generated: " (r.generated) }
                    li { "principal: " (r.principal) }
                    li { "window: " (r.window) }
                    li { "individuals affected: " (r.individuals) }
                    li { "audit records: " (r.records) }
                    li { "records with restricted labels: " (r.restricted) }
                }
                h2 { "Individuals by state or province" }
                table {
                    tr { th { "state" } th { "individuals" } }
                    @for (s, n) in &r.by_state { tr { td { (s) } td { (n) } } }
                    tr { td { "(unknown)" } td { (r.state_unknown) } }
                }
                h2 { "Obligations" }
                table {
                    tr { th { "notify" } th { "owed" } th { "due" } th { "standard" } th { "reference" } }
                    @for ob in &r.obligations {
                        tr {
                            td { (ob.notify) }
                            td { @if ob.owed { "yes" } @else { "no" } }
                            td { (ob.due.as_deref().unwrap_or("-")) }
                            td { (ob.when) }
                            td { (ob.reference) }
                        }
                    }
                }
                h2 { "Risk assessment (45 CFR 164.402(2))" }
                ol {
                    li { "Nature and extent of the PHI: " (ra.nature_and_extent) }
                    li { "The unauthorized person: " (ra.unauthorized_person) }
                    li { "Acquired or viewed: " (ra.acquired_or_viewed) }
                    li { "Mitigation: " (ra.mitigation) }
                }
                p { "Conclusion: " (ra.conclusion) }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_state_codes_reach_the_report() {
        assert_eq!(state_code(" ma"), "MA");
        assert_eq!(state_code("ON"), "ON");
        assert_eq!(state_code("US-CA"), "US-CA");
        for free in [
            "Massachusetts",
            "1 Main St",
            "<b>x</b>",
            "Jane Doe",
            "",
            "M4",
        ] {
            assert_eq!(state_code(free), "(other)", "{free}");
        }
    }
}
