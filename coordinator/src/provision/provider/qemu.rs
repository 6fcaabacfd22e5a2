//! The `qemu` provider: each instance is a qemu process booting an ephemeral qcow2 overlay of
//! a base image (from `deploy/qemu/build-image.sh`) with a NoCloud seed (an ISO labelled
//! `cidata` holding `user-data` and `meta-data`), kernel booted directly.
//!
//! Everything about an instance lives in `<state>/instances/qemu/<id>/`: `tags.json`,
//! `user-data`, `meta-data`, `seed.iso`, `overlay.qcow2`, `console.log` (the serial
//! console), `qemu.pid`. qemu daemonizes, so instances outlive a killed coordinator; the
//! directories are how the next one finds them. Terminating kills qemu and deletes the
//! directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{InstanceSpec, InstanceState, Launch, Listed, Provider, TAG_COORDINATOR};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// Holds `base.qcow2`, `vmlinuz`, `initrd.img` (what build-image.sh writes).
    pub image_dir: PathBuf,
    pub qemu: String,
    pub qemu_img: String,
    /// Makes the seed ISO (genisoimage, or mkisofs which takes the same flags).
    pub mkisofs: String,
    /// `-accel` value. KVM is faster where it works; on a machine whose /dev/kvm aborts qemu
    /// use TCG.
    pub accel: String,
    /// Guest memory, when the step asks for less (or nothing).
    pub memory_mb: u64,
    /// Guest CPUs, when the step asks for fewer.
    pub cpus: u32,
    pub kernel_args: String,
    /// `-netdev` value (`id=n0` is appended); with user networking instances reach the host
    /// as 10.0.2.2.
    pub netdev: String,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            image_dir: PathBuf::from("/var/cache/pype/images/bookworm"),
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            mkisofs: "genisoimage".into(),
            accel: "tcg,thread=multi".into(),
            memory_mb: 1024,
            cpus: 1,
            kernel_args: "root=/dev/vda rw console=ttyS0".into(),
            netdev: "user,restrict=off".into(),
        }
    }
}

pub struct Qemu {
    cfg: QemuConfig,
    dir: PathBuf,
}

impl Qemu {
    pub fn new(cfg: QemuConfig, dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { cfg, dir })
    }

    fn instance_dir(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("invalid qemu instance id {id:?}");
        }
        Ok(self.dir.join(id))
    }

    /// The pid of the instance's qemu, if it is still that qemu (its command line names the
    /// instance directory, so a reused pid is not mistaken for it).
    fn live_pid(&self, dir: &Path) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid")).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = dir.to_string_lossy();
        String::from_utf8_lossy(&cmdline).contains(needle.as_ref()).then_some(pid)
    }

    fn image_file(&self, name: &str) -> Result<PathBuf> {
        let p = self.cfg.image_dir.join(name);
        if !p.exists() {
            bail!(
                "qemu image file {} is missing: build the image with deploy/qemu/build-image.sh --out {}",
                p.display(),
                self.cfg.image_dir.display()
            );
        }
        Ok(p)
    }
}

async fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().await.with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

#[async_trait]
impl Provider for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn create(&self, spec: &InstanceSpec, launch: &Launch) -> Result<String> {
        let user_data = launch.user_data.as_deref().unwrap_or_default().as_bytes();
        let dir = self.instance_dir(&spec.instance_id)?;
        let (base, kernel, initrd) =
            (self.image_file("base.qcow2")?, self.image_file("vmlinuz")?, self.image_file("initrd.img")?);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Tags first: from here on a sweep can find (and terminate) whatever this becomes.
        std::fs::write(dir.join("tags.json"), serde_json::to_vec_pretty(&spec.tags)?)?;
        std::fs::write(dir.join("user-data"), user_data)?;
        std::fs::write(
            dir.join("meta-data"),
            format!("instance-id: {0}\nlocal-hostname: {0}\n", spec.instance_id),
        )?;
        run_tool(
            Command::new(&self.cfg.mkisofs)
                .args(["-quiet", "-output"])
                .arg(dir.join("seed.iso"))
                .args(["-volid", "cidata", "-joliet", "-rock"])
                .arg(dir.join("user-data"))
                .arg(dir.join("meta-data")),
            "making the NoCloud seed (genisoimage)",
        )
        .await?;
        run_tool(
            Command::new(&self.cfg.qemu_img)
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&base)
                .arg(dir.join("overlay.qcow2")),
            "creating the overlay (qemu-img)",
        )
        .await?;
        let memory_mb = (spec.memory_bytes >> 20).max(self.cfg.memory_mb);
        let cpus = spec.cpus.max(self.cfg.cpus).max(1);
        let d = |f: &str| dir.join(f).display().to_string();
        let mut cmd = Command::new(&self.cfg.qemu);
        cmd.args(["-name", &format!("pype-{}", spec.instance_id)])
            .args(["-machine", "q35", "-accel", &self.cfg.accel])
            .args(["-m", &memory_mb.to_string(), "-smp", &cpus.to_string()])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-serial", &format!("file:{}", d("console.log"))])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &self.cfg.kernel_args])
            .args(["-drive", &format!("file={},if=virtio,format=qcow2", d("overlay.qcow2"))])
            .args(["-drive", &format!("file={},if=virtio,format=raw,readonly=on", d("seed.iso"))])
            .args(["-netdev", &format!("{},id=n0", self.cfg.netdev)])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-pidfile", &d("qemu.pid"), "-daemonize"])
            .stdin(std::process::Stdio::null());
        run_tool(&mut cmd, "starting qemu").await?;
        Ok(spec.instance_id.clone())
    }

    async fn preflight(&self) -> Result<()> {
        for f in ["base.qcow2", "vmlinuz", "initrd.img"] {
            self.image_file(f)?;
        }
        for (tool, what) in [
            (&self.cfg.qemu, "qemu (Debian package qemu-system-x86)"),
            (&self.cfg.qemu_img, "qemu-img (Debian package qemu-utils)"),
            (&self.cfg.mkisofs, "genisoimage (Debian package genisoimage)"),
        ] {
            let found = Command::new(tool).arg("--version").output().await.is_ok();
            if !found {
                bail!("{tool} is not installed: the qemu provider needs {what}");
            }
        }
        Ok(())
    }

    async fn describe(&self, provider_id: &str) -> Result<InstanceState> {
        let dir = self.instance_dir(provider_id)?;
        Ok(if self.live_pid(&dir).is_some() { InstanceState::Running } else { InstanceState::Gone })
    }

    async fn terminate(&self, provider_id: &str) -> Result<()> {
        let dir = self.instance_dir(provider_id)?;
        if let Some(pid) = self.live_pid(&dir) {
            signal(pid, rustix::process::Signal::TERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.live_pid(&dir).is_some() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(pid) = self.live_pid(&dir) {
                signal(pid, rustix::process::Signal::KILL);
                while self.live_pid(&dir).is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }

    async fn list(&self, coordinator_tag: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
            let tags: BTreeMap<String, String> = std::fs::read(dir.join("tags.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            // An untagged directory is a create that died before writing its tags: nothing
            // runs there, but it is ours (it is under our state dir), so it is listed.
            if tags.get(TAG_COORDINATOR).is_some_and(|t| t != coordinator_tag) {
                continue;
            }
            let state =
                if self.live_pid(&dir).is_some() { InstanceState::Running } else { InstanceState::Gone };
            out.push(Listed { provider_id: id, state, tags });
        }
        out.sort_by(|a, b| a.provider_id.cmp(&b.provider_id));
        Ok(out)
    }

    async fn console(&self, provider_id: &str) -> Result<Option<String>> {
        let path = self.instance_dir(provider_id)?.join("console.log");
        let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
        let tail = &bytes[bytes.len().saturating_sub(64 * 1024)..];
        Ok(Some(strip_ansi(&String::from_utf8_lossy(tail))))
    }
}

/// Removes terminal escape sequences (systemd colours its status lines).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}
