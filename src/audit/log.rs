//! STUB (being implemented on a branch).
use std::path::Path;

use super::{AuditError, AuditEvent};
use crate::state::AuditHead;

#[derive(Clone)]
pub struct AuditLog;

impl AuditLog {
    pub fn open(_path: &Path, _head: Option<&AuditHead>) -> Result<AuditLog, AuditError> {
        unimplemented!()
    }
    pub async fn append(&self, _ev: AuditEvent) -> Result<AuditHead, AuditError> {
        unimplemented!()
    }
    pub fn append_blocking(&self, _ev: AuditEvent) -> Result<AuditHead, AuditError> {
        unimplemented!()
    }
    pub fn head(&self) -> AuditHead {
        unimplemented!()
    }
    pub async fn close(&self) {}
}
