//! `direct`: files are where the step says they are. Nothing to prepare, harvest or clean up;
//! the trait's defaults do the rest (programs stay on the host, outputs are stat'ed in place).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;

use super::{OverlayVolume, StorageBackend};

pub struct Direct;

#[async_trait]
impl StorageBackend for Direct {
    fn name(&self) -> &str {
        "direct"
    }

    async fn prepare_inputs(&mut self, _inputs: &[String], _ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        Ok(())
    }

    async fn prepare_outputs(
        &mut self,
        _outputs: &[String],
        _output_harvest: &BTreeMap<String, bool>,
        _ovs: &mut Vec<OverlayVolume>,
    ) -> Result<()> {
        Ok(())
    }

    async fn harvest(&mut self, _upper: &Path, _original_dir: &Path) -> Result<()> {
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        Ok(())
    }
}
