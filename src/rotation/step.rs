//! The rotation's state machine: its steps, in order, and why one started.
//! Persisted by the state store as text (`as_str` / `parse`).

use serde::{Deserialize, Serialize};

/// The steps of a rotation, in order. A rotation row records the *next* step to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Create,
    Set,
    Test,
    Promote,
    Deliver,
    /// Waiting for `retire_at`, then retire the previous version.
    Retire,
    Done,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Create,
        Step::Set,
        Step::Test,
        Step::Promote,
        Step::Deliver,
        Step::Retire,
        Step::Done,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Set => "set",
            Step::Test => "test",
            Step::Promote => "promote",
            Step::Deliver => "deliver",
            Step::Retire => "retire",
            Step::Done => "done",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Step::ALL.into_iter().find(|st| st.as_str() == s)
    }
    pub fn next(self) -> Step {
        match self {
            Step::Create => Step::Set,
            Step::Set => Step::Test,
            Step::Test => Step::Promote,
            Step::Promote => Step::Deliver,
            Step::Deliver => Step::Retire,
            Step::Retire | Step::Done => Step::Done,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a rotation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Manual,
    /// Overdue at start-up.
    CatchUp,
    /// First version of a credential that has none.
    Initial,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
            Trigger::CatchUp => "catch_up",
            Trigger::Initial => "initial",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "schedule" => Trigger::Schedule,
            "manual" => Trigger::Manual,
            "catch_up" => Trigger::CatchUp,
            "initial" => Trigger::Initial,
            _ => return None,
        })
    }
}
