//! `_include` and `_revinclude`, with `:iterate`: what a page adds,
//! checked like any read.

use crate::access::ctx::RequestCtx;
use crate::base::error::Failure;
use crate::data::repo::ResourceVersion;
use crate::rest::wire::Query;
use crate::state::FhirState;
use phylax_auth::policy::{decide, Decision, Interaction};
use phylax_fhir::{ResourceId, ResourceType};

/// The resource a reference names on this server (`Type/id` or
/// `Type/id/_history/v`, or the same as an absolute URL under our base);
/// `None` for contained, external or malformed references.
pub(super) fn local_target(st: &FhirState, r: &str) -> Option<(ResourceType, ResourceId)> {
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
    st: &FhirState,
    ctx: &RequestCtx,
    rtype: &ResourceType,
    q: &Query,
    matches: &[ResourceVersion],
) -> Result<Vec<ResourceVersion>, Failure> {
    let (first, iterate) = include_specs(rtype, q)?;
    let mut inc = Includes {
        st,
        ctx,
        seen: matches
            .iter()
            .map(|v| (v.rtype.to_string(), v.id.to_string()))
            .collect(),
        earlier: 0,
        added: Vec::new(),
    };
    let mut out: Vec<ResourceVersion> = Vec::new();
    // Indexes into `out` of the resources added by the previous round.
    let mut frontier: Vec<usize> = Vec::new();
    for round in 0..=MAX_ITERATE_DEPTH {
        let specs = if round == 0 { &first } else { &iterate };
        if specs.is_empty() || (round > 0 && frontier.is_empty()) {
            break;
        }
        let base: Vec<&ResourceVersion> = if round == 0 {
            matches.iter().collect()
        } else {
            frontier.iter().map(|&i| &out[i]).collect()
        };
        for spec in specs {
            if inc.full() {
                break;
            }
            if spec.reverse {
                inc.reverse(&base, spec).await?;
            } else {
                inc.forward(&base, spec).await?;
            }
        }
        let start = out.len();
        out.append(&mut inc.added);
        inc.earlier = out.len();
        frontier = (start..out.len()).collect();
    }
    Ok(out)
}

/// One `_include` or `_revinclude`.
#[derive(Clone)]
struct Spec {
    reverse: bool,
    source: ResourceType,
    param: String,
    target: Option<ResourceType>,
}

/// The include specs for the first pass (over the matches) and for the
/// `:iterate` rounds. An `:iterate` spec also applies to the matches.
fn include_specs(rtype: &ResourceType, q: &Query) -> Result<(Vec<Spec>, Vec<Spec>), Failure> {
    let mut first: Vec<Spec> = Vec::new();
    let mut iterate: Vec<Spec> = Vec::new();
    for (k, v) in &q.0 {
        let (reverse, iter) = match k.as_str() {
            "_include" => (false, false),
            "_revinclude" => (true, false),
            "_include:iterate" => (false, true),
            "_revinclude:iterate" => (true, true),
            _ => continue,
        };
        let (source, param, target) = parse_spec(v)?;
        if !iter && !reverse && &source != rtype {
            return Err(Failure::bad_request(
                "_include must start with the searched resource type (or use _include:iterate)",
            ));
        }
        let spec = Spec {
            reverse,
            source,
            param,
            target,
        };
        first.push(spec.clone());
        if iter {
            iterate.push(spec);
        }
    }
    Ok((first, iterate))
}

/// `Type:parameter[:TargetType]`, where the parameter is an indexed
/// reference parameter of `Type`.
fn parse_spec(v: &str) -> Result<(ResourceType, String, Option<ResourceType>), Failure> {
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
}

/// Includes being gathered: each resource once, at most `MAX_INCLUDED`.
struct Includes<'a> {
    st: &'a FhirState,
    ctx: &'a RequestCtx,
    seen: std::collections::HashSet<(String, String)>,
    /// How many earlier rounds added.
    earlier: usize,
    /// Added by this round.
    added: Vec<ResourceVersion>,
}

impl Includes<'_> {
    fn full(&self) -> bool {
        self.earlier + self.added.len() >= MAX_INCLUDED
    }

    /// `_include`: what `base`'s resources of the spec's source type
    /// reference through its parameter, that the caller may read.
    async fn forward(&mut self, base: &[&ResourceVersion], spec: &Spec) -> Result<(), Failure> {
        for m in base.iter().filter(|m| m.rtype == spec.source) {
            let Some(body) = &m.body else { continue };
            for (code, val) in phylax_fhir::search::extract(&spec.source, body.json()) {
                let phylax_fhir::search::SearchValue::Reference(r) = val else {
                    continue;
                };
                if code != spec.param {
                    continue;
                }
                let Some((t, id)) = local_target(self.st, &r) else {
                    continue;
                };
                if spec.target.as_ref().is_some_and(|tt| tt != &t)
                    || self.full()
                    || decide(self.ctx.principal(), Interaction::Read, Some(t.as_str()))
                        != Decision::Allow
                    || !self.seen.insert((t.to_string(), id.to_string()))
                {
                    continue;
                }
                if let Some(v) = self.st.scoped(self.ctx).visible(&t, &id).await? {
                    self.added.push(v);
                }
            }
        }
        Ok(())
    }

    /// `_revinclude`: resources of the spec's source type whose parameter
    /// references one of `base`, found by a confined search.
    async fn reverse(&mut self, base: &[&ResourceVersion], spec: &Spec) -> Result<(), Failure> {
        if decide(
            self.ctx.principal(),
            Interaction::SearchType,
            Some(spec.source.as_str()),
        ) != Decision::Allow
        {
            return Ok(());
        }
        let targets: Vec<String> = base
            .iter()
            .map(|m| format!("{}/{}", m.rtype, m.id))
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let and = vec![vec![crate::data::search::references_to(
            &self.st.gate.blind_key(),
            &spec.param,
            &targets,
        )]];
        let found = self
            .st
            .scoped(self.ctx)
            .search(phylax_store::SearchQuery {
                rtype: spec.source.to_string(),
                and,
                before_seq: None,
                limit: (MAX_INCLUDED - self.earlier - self.added.len()) as u32,
            })
            .await?;
        for v in found {
            if self.seen.insert((v.rtype.to_string(), v.id.to_string())) {
                self.added.push(v);
            }
        }
        Ok(())
    }
}
