//! `_include` and `_revinclude`, with `:iterate`: what a page adds,
//! checked like any read.

use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::rest::wire::Query;
use crate::state::AppState;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{ResourceId, ResourceType};

/// The resource a reference names on this server (`Type/id` or
/// `Type/id/_history/v`, or the same as an absolute URL under our base);
/// `None` for contained, external or malformed references.
pub(super) fn local_target(st: &AppState, r: &str) -> Option<(ResourceType, ResourceId)> {
    let r = r
        .strip_prefix(st.fhir_base.as_str())
        .and_then(|x| x.strip_prefix('/'))
        .unwrap_or(r);
    let mut parts = r.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) | (Some("_history"), Some(_), None) => {
            Some((ResourceType::parse(t)?, ResourceId::parse(id)?))
        }
        _ => None,
    }
}

/// Most resources `_include`/`_revinclude` add to one page.
pub(super) const MAX_INCLUDED: usize = 1000;

/// Rounds of `:iterate` after the first pass (include loops end when no
/// new resource appears, or here).
pub(super) const MAX_ITERATE_DEPTH: usize = 4;

/// Resources named by `_include=Source:param[:Target]` (references from the
/// matches) and `_revinclude=Source:param` (resources referring to the
/// matches), and with `:iterate` from the included resources too, until
/// nothing new appears. Every included resource passes the same policy as a
/// direct read; one the caller may not see is silently left out, never an
/// error that would reveal it exists. Each resource appears once (loops end).
pub(super) async fn included(
    st: &AppState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    q: &Query,
    matches: &[crate::data::repo::ResourceVersion],
) -> Result<Vec<crate::data::repo::ResourceVersion>, Failure> {
    use std::collections::HashSet;
    type Spec = (bool, ResourceType, String, Option<ResourceType>);
    let parse_spec = |v: &str| -> Result<(ResourceType, String, Option<ResourceType>), Failure> {
        let bad = || Failure::bad_request("_include/_revinclude take Type:parameter[:TargetType]");
        let mut it = v.split(':');
        let src = it.next().and_then(ResourceType::parse).ok_or_else(bad)?;
        let param = it
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(bad)?
            .to_owned();
        let target = match it.next() {
            Some(t) => Some(ResourceType::parse(t).ok_or_else(bad)?),
            None => None,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        let known = phylax_fhir::search::params(&src)
            .get(&param)
            .is_some_and(|p| p.kind == phylax_fhir::search::ParamKind::Reference && p.indexable());
        if !known {
            return Err(Failure::bad_request(format!(
                "{}:{}: not a reference search parameter",
                src,
                param.chars().take(64).collect::<String>()
            )));
        }
        Ok((src, param, target))
    };
    // (reverse?, source, param, target) for the first pass and for iterating.
    let mut first: Vec<Spec> = Vec::new();
    let mut iterate: Vec<Spec> = Vec::new();
    for (k, v) in &q.0 {
        let (rev, iter) = match k.as_str() {
            "_include" => (false, false),
            "_revinclude" => (true, false),
            "_include:iterate" => (false, true),
            "_revinclude:iterate" => (true, true),
            _ => continue,
        };
        let (src, param, target) = parse_spec(v)?;
        if !iter && !rev && &src != rtype {
            return Err(Failure::bad_request(
                "_include must start with the searched resource type (or use _include:iterate)",
            ));
        }
        let spec = (rev, src, param, target);
        // An :iterate spec also applies to the matches themselves.
        first.push(spec.clone());
        if iter {
            iterate.push(spec);
        }
    }
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|v| (v.rtype.to_string(), v.id.to_string()))
        .collect();
    let mut out: Vec<crate::data::repo::ResourceVersion> = Vec::new();
    // Indexes into `out` of the resources added by the previous round.
    let mut frontier: Vec<usize> = Vec::new();
    for round in 0..=MAX_ITERATE_DEPTH {
        let specs = if round == 0 { &first } else { &iterate };
        if specs.is_empty() || (round > 0 && frontier.is_empty()) {
            break;
        }
        let base: Vec<&crate::data::repo::ResourceVersion> = if round == 0 {
            matches.iter().collect()
        } else {
            frontier.iter().map(|&i| &out[i]).collect()
        };
        let mut added = Vec::new();
        for (rev, src, param, target) in specs {
            if out.len() + added.len() >= MAX_INCLUDED {
                break;
            }
            if !rev {
                for m in base.iter().filter(|m| &m.rtype == src) {
                    let Some(body) = &m.body else { continue };
                    for (code, val) in phylax_fhir::search::extract(src, body.json()) {
                        let phylax_fhir::search::SearchValue::Reference(r) = val else {
                            continue;
                        };
                        if code != param {
                            continue;
                        }
                        let Some((t, id)) = local_target(st, &r) else {
                            continue;
                        };
                        if target.as_ref().is_some_and(|tt| tt != &t)
                            || out.len() + added.len() >= MAX_INCLUDED
                            || decide(&ctx.principal, Interaction::Read, Some(t.as_str()))
                                != Decision::Allow
                            || !seen.insert((t.to_string(), id.to_string()))
                        {
                            continue;
                        }
                        if let Some(v) = st.scoped(ctx).visible(&t, &id).await? {
                            added.push(v);
                        }
                    }
                }
            } else {
                if decide(&ctx.principal, Interaction::SearchType, Some(src.as_str()))
                    != Decision::Allow
                {
                    continue;
                }
                let targets: Vec<String> = base
                    .iter()
                    .map(|m| format!("{}/{}", m.rtype, m.id))
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                let and = vec![vec![crate::data::search::references_to(
                    st.gate.blind_key(),
                    param,
                    &targets,
                )]];
                let found = st
                    .scoped(ctx)
                    .search(phylax_store::SearchQuery {
                        rtype: src.to_string(),
                        and,
                        before_seq: None,
                        limit: (MAX_INCLUDED - out.len() - added.len()) as u32,
                    })
                    .await?;
                for v in found {
                    if seen.insert((v.rtype.to_string(), v.id.to_string())) {
                        added.push(v);
                    }
                }
            }
        }
        let start = out.len();
        out.extend(added);
        frontier = (start..out.len()).collect();
    }
    Ok(out)
}
