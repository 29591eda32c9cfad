//! Chained parameters and `_has`: each runs an inner search the caller
//! must be allowed, turned into id conditions on the outer one.

use super::include::local_target;
use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::state::FhirState;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{Issue, IssueCode, ResourceType};

/// Most resources the inner search of a chain or `_has` may match.
pub(super) const MAX_CHAIN: u32 = 1000;

/// Most chained or `_has` parameters in one search (each runs a search).
pub(super) const MAX_CHAINS: usize = 8;

/// The inner search of a chain or `_has`: the caller must be allowed to
/// search its type (else a chain would reveal what it may not see); its
/// parameters must all be understood; it may match at most `MAX_CHAIN`.
pub(super) async fn inner_search(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<Vec<ResourceVersion>, Failure> {
    if decide(
        ctx.principal(),
        Interaction::SearchType,
        Some(rtype.as_str()),
    ) != Decision::Allow
    {
        return Err(Failure::Forbidden);
    }
    crate::rest::mask::check_params(ctx, rtype, params)?;
    let parsed = crate::data::search::parse(&st.gate.blind_key(), &st.fhir_base, rtype, params)?;
    if let Some(u) = parsed.unknown.first() {
        return Err(Failure::BadRequest(vec![Issue::error(
            IssueCode::NotSupported,
            format!("unsupported parameter in a chain or _has: {u}"),
        )]));
    }
    // The inner search sees only what the caller may see: a chain or
    // `_has` must not test data outside their reach.
    let rows = st
        .scoped(ctx)
        .search(phylax_store::SearchQuery {
            rtype: rtype.to_string(),
            and: parsed.and,
            before_seq: None,
            limit: MAX_CHAIN + 1,
        })
        .await?;
    if rows.len() > MAX_CHAIN as usize {
        return Err(Failure::BadRequest(vec![Issue::error(
            IssueCode::TooCostly,
            format!("a chained or _has search may match at most {MAX_CHAIN} resources; narrow it"),
        )]));
    }
    Ok(rows)
}

/// Split chained (`subject:Patient.name=x`, `patient.identifier=x`) and
/// reverse-chained (`_has:Observation:patient:code=x`) parameters off a
/// search and turn each into a condition group: the inner search runs
/// first, and its matches become reference hashes (chain) or ids (`_has`)
/// of the outer search. One level only.
pub(super) async fn resolve_chains(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    params: &[(String, String)],
) -> Result<(Vec<(String, String)>, Vec<Vec<phylax_store::Cond>>), Failure> {
    let mut plain = Vec::new();
    let mut groups = Vec::new();
    let chains = params
        .iter()
        .filter(|(n, _)| n.starts_with("_has:") || n.contains('.'))
        .count();
    if chains > MAX_CHAINS {
        return Err(Failure::bad_request(format!(
            "at most {MAX_CHAINS} chained or _has parameters per search"
        )));
    }
    for (name, value) in params {
        if let Some(rest) = name.strip_prefix("_has:") {
            groups.push(reverse_chain(st, ctx, rtype, name, rest, value).await?);
            continue;
        }
        let Some((head, inner)) = name.split_once('.') else {
            plain.push((name.clone(), value.clone()));
            continue;
        };
        groups.push(chain(st, ctx, rtype, name, head, inner, value).await?);
    }
    Ok((plain, groups))
}

fn shown(n: &str) -> String {
    n.chars().take(64).collect()
}

/// `_has:Type:refParam:innerParam=value`: the ids of `rtype` that matches
/// of the inner search reference.
async fn reverse_chain(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    name: &str,
    rest: &str,
    value: &str,
) -> Result<Vec<phylax_store::Cond>, Failure> {
    use phylax_store::Cond;
    let mut parts = rest.splitn(3, ':');
    let (Some(t), Some(refp), Some(inner)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Failure::bad_request(format!(
            "{}: _has takes _has:Type:reference:parameter",
            shown(name)
        )));
    };
    if inner.starts_with("_has") || inner.contains('.') {
        return Err(Failure::NotImplemented(
            "only one level of _has or chaining is supported",
        ));
    }
    let inner_type = ResourceType::parse(t)
        .ok_or_else(|| Failure::bad_request(format!("{}: unknown type", shown(name))))?;
    let is_ref = phylax_fhir::search::params(&inner_type)
        .get(refp)
        .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference);
    if !is_ref {
        return Err(Failure::bad_request(format!(
            "{}: not a reference parameter of {inner_type}",
            shown(name)
        )));
    }
    let rows = inner_search(
        st,
        ctx,
        &inner_type,
        &[(inner.to_owned(), value.to_owned())],
    )
    .await?;
    let mut ids = std::collections::BTreeSet::new();
    for v in &rows {
        let Some(b) = &v.body else { continue };
        for (code, val) in phylax_fhir::search::extract(&inner_type, b.json()) {
            if code != refp {
                continue;
            }
            if let phylax_fhir::search::SearchValue::Reference(r) = val {
                if let Some((t, id)) = local_target(st, &r) {
                    if &t == rtype {
                        ids.insert(id.to_string());
                    }
                }
            }
        }
    }
    Ok(vec![if ids.is_empty() {
        Cond::Never
    } else {
        Cond::Ids(ids.into_iter().collect())
    }])
}

/// `refParam[:Type].innerParam=value`: references to the matches of the
/// inner search (on the named type, or every target type that has the
/// parameter and the caller may search).
async fn chain(
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    name: &str,
    head: &str,
    inner: &str,
    value: &str,
) -> Result<Vec<phylax_store::Cond>, Failure> {
    use phylax_store::Cond;
    if inner.contains('.') || inner.starts_with("_has") {
        return Err(Failure::NotImplemented(
            "only one level of _has or chaining is supported",
        ));
    }
    let (code, type_mod) = match head.split_once(':') {
        Some((c, t)) => (c, Some(t)),
        None => (head, None),
    };
    let is_ref = phylax_fhir::search::params(rtype)
        .get(code)
        .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference);
    if !is_ref {
        return Err(Failure::bad_request(format!(
            "{}: chaining needs a reference parameter of {rtype}",
            shown(name)
        )));
    }
    let inner_code = inner.split(':').next().unwrap_or(inner);
    let candidates: Vec<ResourceType> = match type_mod {
        Some(t) => vec![ResourceType::parse(t)
            .ok_or_else(|| Failure::bad_request(format!("{}: unknown type", shown(name))))?],
        // No type given: every target type that has the parameter.
        None => phylax_fhir::defs::definitions()
            .reference_targets(rtype.as_str(), code)
            .iter()
            .filter_map(|t| ResourceType::parse(t))
            .filter(|t| {
                inner_code.starts_with('_')
                    || phylax_fhir::search::params(t).contains_key(inner_code)
            })
            .collect(),
    };
    if candidates.is_empty() {
        return Err(Failure::bad_request(format!(
            "{}: no target type of {code} has that parameter",
            shown(name)
        )));
    }
    let mut targets = Vec::new();
    for t in &candidates {
        // Types the caller may not search are skipped when the type was
        // not named; naming one is a plain request (403 if denied).
        if type_mod.is_none()
            && decide(ctx.principal(), Interaction::SearchType, Some(t.as_str())) != Decision::Allow
        {
            continue;
        }
        for v in inner_search(st, ctx, t, &[(inner.to_owned(), value.to_owned())]).await? {
            targets.push(format!("{}/{}", v.rtype, v.id));
        }
        if targets.len() > MAX_CHAIN as usize {
            return Err(Failure::BadRequest(vec![Issue::error(
                IssueCode::TooCostly,
                format!("a chained search may match at most {MAX_CHAIN} resources; narrow it"),
            )]));
        }
    }
    Ok(vec![if targets.is_empty() {
        Cond::Never
    } else {
        crate::data::search::references_to(&st.gate.blind_key(), code, &targets)
    }])
}
