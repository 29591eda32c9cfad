//! Notification obligations and their deadlines, from the discovery time
//! and the scope's counts (pure: no clock, no store). The rules, with
//! their references, are in docs/INCIDENT_RESPONSE.md; what the law asks
//! beyond a date (the risk assessment that decides whether a breach is
//! notifiable at all) is the security officer's, and the report leaves
//! room for it.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// A legal regime to report under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Jurisdiction {
    UsHipaa,
    EuGdpr,
    CaPipeda,
    UsCaCcpa,
}

impl std::str::FromStr for Jurisdiction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "us-hipaa" => Jurisdiction::UsHipaa,
            "eu-gdpr" => Jurisdiction::EuGdpr,
            "ca-pipeda" => Jurisdiction::CaPipeda,
            "us-ca-ccpa" => Jurisdiction::UsCaCcpa,
            _ => {
                return Err(format!(
                    "unknown jurisdiction {s:?}: us-hipaa, eu-gdpr, ca-pipeda or us-ca-ccpa"
                ))
            }
        })
    }
}

/// One notification that may be owed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Obligation {
    pub jurisdiction: Jurisdiction,
    /// Whom to notify.
    pub notify: String,
    /// Whether the counts make it owed (a breach the risk assessment
    /// finds notifiable); `false` rows say why not.
    pub owed: bool,
    /// The latest time (RFC 3339, UTC), if the law sets one; else the
    /// text of `when` is the standard.
    pub due: Option<String>,
    pub when: String,
    pub reference: String,
}

/// What the deadlines depend on.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// When the organisation became aware (ms).
    pub discovered: i64,
    /// Distinct individuals affected.
    pub individuals: u64,
    /// Individuals per state or province (from their addresses; those
    /// without one are not counted here).
    pub by_state: BTreeMap<String, u64>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The end (last millisecond, UTC) of the `days`-th calendar day after
/// the day of `discovered`: "within 60 calendar days of discovery" leaves
/// the whole of the sixtieth day.
fn end_of_day_after(discovered: DateTime<Utc>, days: i64) -> DateTime<Utc> {
    let day = discovered.date_naive() + Duration::days(days);
    end_of(day)
}

fn end_of(day: NaiveDate) -> DateTime<Utc> {
    let next = day + Duration::days(1);
    Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0).unwrap_or_default())
        - Duration::milliseconds(1)
}

/// Every obligation under `regimes` for `f`.
pub fn obligations(f: &Facts, regimes: &[Jurisdiction]) -> Vec<Obligation> {
    let found = DateTime::<Utc>::from_timestamp_millis(f.discovered).unwrap_or_default();
    let mut out = Vec::new();
    for j in regimes {
        match j {
            Jurisdiction::UsHipaa => hipaa(f, found, &mut out),
            Jurisdiction::EuGdpr => gdpr(found, &mut out),
            Jurisdiction::CaPipeda => pipeda(found, &mut out),
            Jurisdiction::UsCaCcpa => california(f, &mut out),
        }
    }
    out
}

fn row(
    jurisdiction: Jurisdiction,
    notify: &str,
    owed: bool,
    due: Option<DateTime<Utc>>,
    when: &str,
    reference: &str,
) -> Obligation {
    Obligation {
        jurisdiction,
        notify: notify.to_owned(),
        owed,
        due: due.map(rfc3339),
        when: when.to_owned(),
        reference: reference.to_owned(),
    }
}

fn hipaa(f: &Facts, found: DateTime<Utc>, out: &mut Vec<Obligation>) {
    use Jurisdiction::UsHipaa as J;
    let sixty = end_of_day_after(found, 60);
    out.push(row(
        J,
        "each affected individual (first-class mail, or email if agreed)",
        f.individuals > 0,
        Some(sixty),
        "without unreasonable delay and no later than 60 calendar days after discovery",
        "45 CFR 164.404",
    ));
    if f.individuals >= 500 {
        out.push(row(
            J,
            "the Secretary of HHS (breach portal)",
            true,
            Some(sixty),
            "contemporaneously with the individual notices, within 60 days: 500 or more individuals",
            "45 CFR 164.408(b)",
        ));
    } else {
        // The annual log: within 60 days of the end of the calendar year
        // of discovery.
        let year_end = NaiveDate::from_ymd_opt(found.year(), 12, 31).unwrap_or_default();
        out.push(row(
            J,
            "the Secretary of HHS (annual log of breaches under 500)",
            f.individuals > 0,
            Some(end_of(year_end + Duration::days(60))),
            "within 60 days of the end of the calendar year of discovery: fewer than 500 individuals",
            "45 CFR 164.408(c)",
        ));
    }
    let states: Vec<&String> = f
        .by_state
        .iter()
        .filter(|(_, n)| **n > 500)
        .map(|(s, _)| s)
        .collect();
    out.push(row(
        J,
        &if states.is_empty() {
            "prominent media outlets: no state or jurisdiction has more than 500 affected residents"
                .to_owned()
        } else {
            format!(
                "prominent media outlets serving {}",
                states
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        !states.is_empty(),
        (!states.is_empty()).then_some(sixty),
        "within 60 days of discovery, when more than 500 residents of a state or jurisdiction are affected",
        "45 CFR 164.406",
    ));
}

fn gdpr(found: DateTime<Utc>, out: &mut Vec<Obligation>) {
    use Jurisdiction::EuGdpr as J;
    out.push(row(
        J,
        "the supervisory authority",
        true,
        Some(found + Duration::hours(72)),
        "without undue delay and, where feasible, not later than 72 hours after becoming aware, unless the breach is unlikely to result in a risk to the rights and freedoms of natural persons",
        "GDPR Art. 33(1)",
    ));
    out.push(row(
        J,
        "the data subjects, when the breach is likely to result in a high risk to them",
        true,
        None,
        "without undue delay",
        "GDPR Art. 34",
    ));
    out.push(row(
        J,
        "the breach register (facts, effects, remedial action)",
        true,
        None,
        "always, notified or not: `phylax incident list`",
        "GDPR Art. 33(5)",
    ));
}

fn pipeda(found: DateTime<Utc>, out: &mut Vec<Obligation>) {
    use Jurisdiction::CaPipeda as J;
    out.push(row(
        J,
        "the Privacy Commissioner of Canada and the affected individuals, when there is a real risk of significant harm",
        true,
        None,
        "as soon as feasible after determining that the breach occurred",
        "PIPEDA s. 10.1(1)-(3)",
    ));
    let keep = found
        .date_naive()
        .checked_add_months(chrono::Months::new(24))
        .map(end_of);
    out.push(row(
        J,
        "the record of the breach (kept at least until)",
        true,
        keep,
        "every breach of security safeguards is recorded and the record kept 24 months after the day the organisation determined it occurred",
        "PIPEDA s. 10.3; Breach of Security Safeguards Regulations s. 6",
    ));
}

fn california(f: &Facts, out: &mut Vec<Obligation>) {
    use Jurisdiction::UsCaCcpa as J;
    let residents = f.by_state.get("CA").copied().unwrap_or(0);
    out.push(row(
        J,
        "each affected California resident",
        residents > 0,
        None,
        "in the most expedient time possible and without unreasonable delay",
        "Cal. Civ. Code 1798.82(a)",
    ));
    out.push(row(
        J,
        "the California Attorney General (a sample copy of the notice)",
        residents > 500,
        None,
        "when more than 500 California residents are notified for one breach",
        "Cal. Civ. Code 1798.82(f)",
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn facts(t: &str, n: u64, states: &[(&str, u64)]) -> Facts {
        Facts {
            discovered: at(t),
            individuals: n,
            by_state: states.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
        }
    }

    fn find<'a>(o: &'a [Obligation], what: &str) -> &'a Obligation {
        o.iter().find(|x| x.notify.contains(what)).unwrap()
    }

    #[test]
    fn hipaa_thresholds_at_the_edges() {
        let t = "2026-03-10T12:00:00Z";
        for (n, hhs_now) in [(499, false), (500, true), (501, true)] {
            let o = obligations(&facts(t, n, &[]), &[Jurisdiction::UsHipaa]);
            let hhs = o.iter().find(|x| x.notify.contains("Secretary")).unwrap();
            assert_eq!(hhs.notify.contains("annual"), !hhs_now, "{n}");
            assert_eq!(
                hhs.due.as_deref(),
                Some(if hhs_now {
                    "2026-05-09T23:59:59.999Z"
                } else {
                    // 60 days after 31 December 2026.
                    "2027-03-01T23:59:59.999Z"
                }),
                "{n}"
            );
        }
        // Media: more than 500 residents of one state, not 500.
        for (n, owed) in [(500, false), (501, true)] {
            let o = obligations(
                &facts(t, 900, &[("MA", n), ("RI", 3)]),
                &[Jurisdiction::UsHipaa],
            );
            let m = find(&o, "media");
            assert_eq!(m.owed, owed, "{n}");
            assert_eq!(m.notify.contains("MA"), owed);
            assert!(!m.notify.contains("RI"));
        }
    }

    #[test]
    fn sixty_days_run_from_the_day_of_discovery_in_utc() {
        let before = obligations(
            &facts("2026-12-07T23:59:59Z", 1, &[]),
            &[Jurisdiction::UsHipaa],
        );
        let after = obligations(
            &facts("2026-12-08T00:00:01Z", 1, &[]),
            &[Jurisdiction::UsHipaa],
        );
        assert_eq!(
            find(&before, "individual").due.as_deref(),
            Some("2027-02-05T23:59:59.999Z")
        );
        assert_eq!(
            find(&after, "individual").due.as_deref(),
            Some("2027-02-06T23:59:59.999Z")
        );
        // A leap year's annual log ends on 29 February.
        let leap = obligations(
            &facts("2027-06-01T00:00:00Z", 3, &[]),
            &[Jurisdiction::UsHipaa],
        );
        assert_eq!(
            find(&leap, "annual").due.as_deref(),
            Some("2028-02-29T23:59:59.999Z")
        );
    }

    #[test]
    fn gdpr_72_hours_to_the_millisecond() {
        let o = obligations(
            &facts("2026-12-07T23:59:59.500Z", 10, &[]),
            &[Jurisdiction::EuGdpr],
        );
        assert_eq!(
            find(&o, "supervisory").due.as_deref(),
            Some("2026-12-10T23:59:59.500Z")
        );
        assert_eq!(find(&o, "data subjects").due, None);
    }

    #[test]
    fn pipeda_and_california() {
        let o = obligations(
            &facts("2026-02-28T10:00:00Z", 700, &[("CA", 501)]),
            &[Jurisdiction::CaPipeda, Jurisdiction::UsCaCcpa],
        );
        assert_eq!(
            find(&o, "record of the breach").due.as_deref(),
            Some("2028-02-28T23:59:59.999Z")
        );
        assert!(find(&o, "Attorney General").owed);
        let o = obligations(
            &facts("2026-02-28T10:00:00Z", 700, &[("CA", 500)]),
            &[Jurisdiction::UsCaCcpa],
        );
        assert!(!find(&o, "Attorney General").owed);
        assert!("xx".parse::<Jurisdiction>().is_err());
    }
}
