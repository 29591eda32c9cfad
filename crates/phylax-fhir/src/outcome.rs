//! `OperationOutcome` construction. Every API error becomes one of these;
//! messages are written by Phylax, never copied from resource content, so an
//! outcome is safe to return and to log.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// The subset of the FHIR `issue-type` value set Phylax uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Security,
    Login,
    Forbidden,
    NotFound,
    Deleted,
    TooLong,
    TooCostly,
    CodeInvalid,
    NotSupported,
    Conflict,
    Exception,
    Transient,
    Informational,
    Processing,
    Throttled,
    Timeout,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::TooLong => "too-long",
            IssueCode::TooCostly => "too-costly",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Conflict => "conflict",
            IssueCode::Exception => "exception",
            IssueCode::Transient => "transient",
            IssueCode::Timeout => "timeout",
            IssueCode::Informational => "informational",
            IssueCode::Processing => "processing",
            IssueCode::Throttled => "throttled",
        }
    }
}

/// One problem, located by a FHIRPath expression when it concerns an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    pub diagnostics: String,
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }
}

/// An `OperationOutcome` under construction.
#[derive(Debug, Clone, Default)]
pub struct OperationOutcome {
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    pub fn single(issue: Issue) -> Self {
        OperationOutcome {
            issues: vec![issue],
        }
    }

    /// Render as FHIR JSON. `correlation_id` (the request id) is attached so
    /// an operator can find the server-side log line for this error.
    pub fn to_json(&self, correlation_id: Option<&str>) -> Value {
        let issues: Vec<Value> = self
            .issues
            .iter()
            .map(|i| {
                let mut v = json!({
                    "severity": i.severity.as_str(),
                    "code": i.code.as_str(),
                    "diagnostics": i.diagnostics,
                });
                if let Some(e) = &i.expression {
                    v["expression"] = json!([e]);
                }
                v
            })
            .collect();
        let mut oo = json!({"resourceType": "OperationOutcome", "issue": issues});
        if let Some(id) = correlation_id {
            oo["id"] = json!(id);
        }
        oo
    }
}
