//! STUB.
use super::Generated;
use crate::config::GeneratorConfig;

pub fn generate(cfg: &GeneratorConfig) -> Generated {
    let _ = cfg;
    unimplemented!()
}
