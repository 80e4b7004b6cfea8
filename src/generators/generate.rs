//! STUB.
use super::Generated;
use crate::config::GeneratorConfig;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GenerateError(pub String);

pub fn generate(cfg: &GeneratorConfig) -> Result<Generated, GenerateError> {
    let _ = cfg;
    unimplemented!()
}
