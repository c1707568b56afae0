//! The filters of operators' listings, the same for both backends.

use uuid::Uuid;

use crate::directives::State;

/// Filters of a directive listing.
#[derive(Debug, Clone, Default)]
pub struct DirectiveFilter {
    /// Only this spoke.
    pub spoke_id: Option<Uuid>,
    /// Only this state.
    pub state: Option<State>,
    /// Only this type.
    pub directive_type: Option<String>,
    /// Only this group.
    pub group_id: Option<Uuid>,
    /// Only ids below this one (the page token: newest first).
    pub before_id: Option<Uuid>,
}

/// Filters of a metric query.
#[derive(Debug, Clone, Default)]
pub struct MetricFilter {
    /// Only this spoke.
    pub spoke_id: Option<Uuid>,
    /// Only this domain.
    pub domain: Option<String>,
    /// Only this name.
    pub name: Option<String>,
    /// Only points at or after this time, Unix ns.
    pub start_ns: Option<i64>,
    /// Only points before this time, Unix ns.
    pub end_ns: Option<i64>,
    /// Only rows after this row id (the page token).
    pub after_row: Option<i64>,
}
