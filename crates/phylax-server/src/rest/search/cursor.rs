//! Sealed paging cursors: a page position and the search it belongs to,
//! encrypted so that no next-page URL shows a search term.

use crate::base::error::Failure;
use crate::state::FhirState;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

/// Search cursors are sealed (AES-256-GCM under a KEK-wrapped key) rather
/// than only MACed: they carry the search parameters, so that a next-page
/// URL never shows a search term (URLs end up in proxy logs), and an edited
/// or foreign cursor fails to open. They expire after an hour.
pub(super) const CURSOR_TTL_MS: i64 = 3_600_000;

/// Positions of earlier pages a cursor remembers, for `previous` links.
pub(super) const MAX_BACK: usize = 200;

/// A page position: the keyset bound (`seq` before which rows are listed)
/// or, for sorted searches, the offset; `FIRST_PAGE` for the first page.
pub(super) const FIRST_PAGE: i64 = -1;

/// An opened search cursor: the parameters, this page's position, and the
/// positions of the pages before it (most recent last).
pub(super) struct Cursor {
    pub(super) params: Vec<(String, String)>,
    pub(super) at: i64,
    pub(super) back: Vec<i64>,
}

pub(super) async fn seal_search_cursor(
    st: &FhirState,
    rtype: &str,
    params: &[(String, String)],
    before: i64,
    back: &[i64],
) -> Result<String, Failure> {
    let (scope, _) = st.cursors.search_scopes();
    let key = st
        .keys
        .for_write(&scope)
        .await
        .map_err(crate::data::repo::RepoError::from)?;
    let back = &back[back.len().saturating_sub(MAX_BACK)..];
    let body = json!({"p": params, "b": before, "s": back, "e": crate::base::clock::now_ms() + CURSOR_TTL_MS})
        .to_string();
    let sealed = key
        .seal(
            format!("phylax/search-cursor/v1\0{rtype}").as_bytes(),
            body.as_bytes(),
        )
        .map_err(|_| Failure::Internal("cursor seal failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(sealed))
}

pub(super) async fn open_search_cursor(
    st: &FhirState,
    rtype: &str,
    cursor: &str,
) -> Result<Cursor, Failure> {
    let bad = || Failure::bad_request("invalid, expired or tampered paging cursor");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    // Sealed under the current generation's key, or the previous one's
    // (issued before a rotation: docs/KEYS.md).
    let (current, previous) = st.cursors.search_scopes();
    let aad = format!("phylax/search-cursor/v1\0{rtype}");
    let key = st
        .keys
        .for_write(&current)
        .await
        .map_err(crate::data::repo::RepoError::from)?;
    let plain = match key.open(aad.as_bytes(), &raw) {
        Ok(p) => p,
        Err(_) => {
            let Some(previous) = previous else {
                return Err(bad());
            };
            // A key already retired opens nothing: the cursor is refused
            // like any other that does not open.
            let old = match st.keys.for_read(&previous).await {
                Ok(k) => k,
                Err(crate::data::keyring::KeyError::Missing) => return Err(bad()),
                Err(e) => return Err(crate::data::repo::RepoError::from(e).into()),
            };
            old.open(aad.as_bytes(), &raw).map_err(|_| bad())?
        }
    };
    let v: Value = serde_json::from_slice(&plain).map_err(|_| bad())?;
    if v["e"]
        .as_i64()
        .is_none_or(|e| e < crate::base::clock::now_ms())
    {
        return Err(bad());
    }
    let params = v["p"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .filter_map(|pair| {
            Some((
                pair.get(0)?.as_str()?.to_owned(),
                pair.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect();
    let back = match v.get("s").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(Value::as_i64)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?,
        None => Vec::new(),
    };
    Ok(Cursor {
        params,
        at: v["b"].as_i64().ok_or_else(bad)?,
        back,
    })
}
