//! STUB (being implemented on a branch).
use std::time::Duration;

use crate::state::Step;

pub struct Metrics;

impl Metrics {
    pub fn audit_record(&self) {}
    pub fn rotation_finished(&self, _ok: bool, _d: Duration) {}
    pub fn step_failed(&self, _s: Step) {}
    pub fn delivery(&self, _sink: &str, _ok: bool) {}
}
