//! The log filter. Operators choose verbosity with `PHYLAX_LOG`, but some
//! dependencies log what must never reach a log at DEBUG/TRACE: query
//! parameters (tokio-postgres), HTTP headers including bearer tokens and
//! frames (hyper, h2), TLS details (rustls). Those targets are capped at
//! INFO whatever the operator asks; the test `tests/logs.rs` runs at TRACE
//! through this filter and greps for PHI.

use tracing_subscriber::filter::{Directive, EnvFilter};

/// Targets that are never logged below INFO.
pub const CAPPED: &[&str] = &[
    "tokio_postgres",
    "postgres_protocol",
    "deadpool_postgres",
    "rusqlite",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tokio_rustls",
    "tower_http",
    "axum",
    "reqwest",
];

/// Build the filter from an operator's directive string (e.g. `debug`,
/// `phylax=trace`), with the caps applied last so they win.
pub fn filter(user: &str) -> EnvFilter {
    let mut f = EnvFilter::try_new(user).unwrap_or_else(|_| EnvFilter::new("info"));
    for t in CAPPED {
        // A fixed, valid directive; parsing cannot fail.
        if let Ok(d) = format!("{t}=info").parse::<Directive>() {
            f = f.add_directive(d);
        }
    }
    f
}
