//! The current request's id, for logs and audit records made anywhere
//! below the handler that serves it.

tokio::task_local! {
    /// The current request's id, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The current request id, if inside a request.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|r| r.clone()).ok()
}
