//! `direct`: files are where the step says they are; every method is a no-op except
//! `check_outputs`, which stats the paths.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;

use super::{OverlayVolume, StorageBackend, stat_local};

pub struct Direct;

#[async_trait]
impl StorageBackend for Direct {
    fn name(&self) -> &str {
        "direct"
    }

    async fn prepare_inputs(&mut self, _inputs: &[String], _ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        Ok(())
    }

    async fn restore_program(&mut self, _profile_name: &str, _program_key: &str) -> Result<()> {
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

    async fn check_outputs(&mut self, paths: &[String]) -> Result<BTreeMap<String, Option<u64>>> {
        stat_local(paths).await
    }

    async fn prepare_build(&mut self, _paths: &[String], _program_keys: &[String]) -> Result<()> {
        Ok(())
    }

    async fn stage_program(&mut self, _profile: &str, _key: &str, _artifact_path: &Path) -> Result<()> {
        Ok(())
    }
}
