//! Checkpoints: `DIR/step-NNNNNNNN/{model.safetensors, optimizer.safetensors, meta.json, job.toml}`,
//! plus `banks.safetensors` (the memory banks) in the memory-bank variant.
//!
//! A checkpoint is written into a hidden temporary directory next to its final place and renamed
//! into place only when complete, then `DIR/latest` is replaced (temp file + rename) to name it. A
//! crash at any moment leaves either the previous checkpoint or the new one, never a torn one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `meta.json`: where training stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    pub format: String,
    pub job_id: String,
    /// Steps completed (the next step to train).
    pub step: u64,
    /// Data-plan position of the next step: its epoch and the slot its global batch starts at.
    pub epoch: u64,
    pub next_slot_in_epoch: u64,
    pub generation: u64,
    pub world_size: u32,
    pub loss_total: f64,
    pub created_unix_ms: u64,
}

pub const FORMAT: &str = "hcmoco-checkpoint/1";

/// Named tensors, as stored in a safetensors file.
pub type Named = Vec<(String, Tensor)>;

fn fsync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))
}

/// Removes temporaries (`.NAME.tmp-PID`, `.NAME.old-PID`, `.latest.tmp-PID`) left by writers that are
/// no longer running (this process's own included: it writes one checkpoint at a time).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix('.').and_then(|n| n.rsplit_once('-')).map(|(_, pid)| pid.to_string()) else {
            continue;
        };
        let ours = pid == std::process::id().to_string();
        let temporary = name.contains(".tmp-") || name.contains(".old-");
        if temporary && pid.parse::<u32>().is_ok() && (ours || !Path::new(&format!("/proc/{pid}")).exists()) {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// Writes a complete checkpoint atomically and returns its directory.
pub fn write(
    dir: &Path,
    meta: &CheckpointMeta,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    banks: &[(String, Tensor)],
    job_toml: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let name = format!("step-{:08}", meta.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    remove_stale_temporaries(dir);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // The temp names end in .safetensors: libtorch picks the format from the extension.
    let model_path = tmp.join("model.safetensors");
    Tensor::write_safetensors(model, &model_path).with_context(|| format!("cannot write {}", model_path.display()))?;
    sync_file(&model_path)?;
    let opt_path = tmp.join("optimizer.safetensors");
    Tensor::write_safetensors(optimizer, &opt_path).with_context(|| format!("cannot write {}", opt_path.display()))?;
    sync_file(&opt_path)?;
    if !banks.is_empty() {
        let banks_path = tmp.join("banks.safetensors");
        Tensor::write_safetensors(banks, &banks_path)
            .with_context(|| format!("cannot write {}", banks_path.display()))?;
        sync_file(&banks_path)?;
    }
    write_file(&tmp.join("meta.json"), serde_json::to_string_pretty(meta)?.as_bytes())?;
    write_file(&tmp.join("job.toml"), job_toml.as_bytes())?;
    fsync_dir(&tmp);
    // A re-run of the same step replaces the old copy: move it aside first, so that a crash leaves
    // either copy in place, never neither.
    let aside = dir.join(format!(".{name}.old-{}", std::process::id()));
    let replaced = final_dir.exists();
    if replaced {
        std::fs::rename(&final_dir, &aside).with_context(|| format!("cannot move {} aside", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    let latest_tmp = dir.join(format!(".latest.tmp-{}", std::process::id()));
    write_file(&latest_tmp, format!("{name}\n").as_bytes())?;
    std::fs::rename(&latest_tmp, dir.join("latest")).context("cannot update the latest pointer")?;
    fsync_dir(dir);
    if replaced {
        let _ = std::fs::remove_dir_all(&aside);
    }
    Ok(final_dir)
}

/// Reads a checkpoint directory: metadata, model tensors, optimizer tensors, and the memory banks when
/// it has them.
pub fn read(dir: &Path) -> anyhow::Result<(CheckpointMeta, Named, Named, Option<Named>)> {
    let meta_path = dir.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).with_context(|| format!("cannot read {}", meta_path.display()))?;
    let meta: CheckpointMeta = serde_json::from_str(&text).with_context(|| format!("bad {}", meta_path.display()))?;
    if meta.format != FORMAT {
        anyhow::bail!("{}: format {:?}, expected {FORMAT:?}", meta_path.display(), meta.format);
    }
    let model = Tensor::read_safetensors(dir.join("model.safetensors"))
        .with_context(|| format!("bad model weights in {}", dir.display()))?;
    let opt = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
        .with_context(|| format!("bad optimizer state in {}", dir.display()))?;
    let banks_path = dir.join("banks.safetensors");
    let banks = if banks_path.is_file() {
        Some(Tensor::read_safetensors(&banks_path).with_context(|| format!("bad memory banks in {}", dir.display()))?)
    } else {
        None
    };
    Ok((meta, model, opt, banks))
}

/// The directory `DIR/latest` names, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(dir.join("latest")).ok()?;
    let p = dir.join(name.trim());
    p.is_dir().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_and_updates_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            job_id: "job-1".into(),
            step: 3,
            epoch: 0,
            next_slot_in_epoch: 12,
            generation: 1,
            world_size: 2,
            loss_total: 1.5,
            created_unix_ms: 0,
        };
        let model = vec![("rgb.head.weight".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))];
        let opt = vec![("momentum.rgb.head.weight".to_string(), Tensor::from_slice(&[0.5f32, 0.25]))];
        let p = write(dir.path(), &meta, &model, &opt, &[], "steps = 3\n").expect("write");
        assert_eq!(latest(dir.path()), Some(p.clone()));
        let (m, w, o, banks) = read(&p).expect("read");
        assert_eq!(m, meta);
        assert!(w[0].1.equal(&model[0].1) && o[0].1.equal(&opt[0].1));
        assert!(banks.is_none(), "no banks written, none read");
        // No temporary leftovers.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
        // A second checkpoint moves the pointer.
        let meta2 = CheckpointMeta { step: 6, ..meta };
        let bank = vec![("bank.rgb".to_string(), Tensor::from_slice(&[0.6f32, 0.8]).view([1, 2]))];
        let p2 = write(dir.path(), &meta2, &model, &opt, &bank, "").expect("write");
        assert_eq!(latest(dir.path()), Some(p2.clone()));
        let (.., banks) = read(&p2).expect("read with banks");
        assert!(banks.expect("banks")[0].1.equal(&bank[0].1));
        assert!(p.is_dir(), "older checkpoints are kept");
        // Re-writing a step replaces it; a temporary left by a dead writer is cleaned up.
        let stale = dir.path().join(".step-00000003.tmp-4000000000");
        std::fs::create_dir(&stale).expect("stale temp");
        let again = write(dir.path(), &meta2, &model, &opt, &[], "x").expect("rewrite");
        assert_eq!(std::fs::read_to_string(again.join("job.toml")).expect("toml"), "x");
        assert!(!stale.exists());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp") && !n.contains(".old")), "{names:?}");
    }
}
