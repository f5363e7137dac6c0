//! Where a run starts, and whether it may. A checkpoint folder belongs to one training of one
//! dataset and one model: rank 0 claims the folder at start (writable, locked for the training's
//! life, holding no checkpoint of another dataset, model, recipe or vocabulary; before the
//! "already over" check, whatever the budget), then restores the newest good checkpoint (everyone
//! gets rank 0's state), or in a folder without checkpoints the weights of `--init-from` as a new
//! training; or nothing when the checkpoint already spent the budget.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sha2::{Digest, Sha256};

use charlm_contract::{ProgressReport, StopReason};

use super::checkpoint::{self, DatasetId, InitFrom, Manifest};
use super::lock::{self, FolderLock};
use super::plan::{schedule_change, Batch, Plan, ScheduleInputs};
use super::recipe::Recipe;
use super::state::RunState;
use crate::data::format::Manifest as DataManifest;
use crate::engine::Engine;
use crate::model::GptConfig;
use crate::user_bail;

/// The identity of the prepared dataset in `path` (manifest `data`): its manifest's digest (of its
/// canonical JSON, so equal for byte-identical data wherever it lies).
pub fn dataset_id(path: &Path, data: &DataManifest) -> DatasetId {
    let canonical = serde_json::to_vec(data).unwrap_or_default();
    DatasetId {
        digest: format!("{:x}", Sha256::digest(&canonical)),
        path: path
            .canonicalize()
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string(),
        train_characters: data.train.characters,
        val_characters: data.val.characters,
    }
}

/// How a refusal names the ways on: `train` names its own flags; `run`, which picks the folder
/// itself and passes `train` flags after `--`, names its `--model-tag` and `-- --init-from`.
#[derive(Clone, Copy, Debug)]
pub struct Remedy {
    /// What to give for another checkpoint folder.
    pub other_folder: &'static str,
    /// The flag that starts a new training from a checkpoint's weights.
    pub init_from: &'static str,
}

pub const TRAIN_REMEDY: Remedy = Remedy {
    other_folder: "another --checkpoint-dir",
    init_from: "--init-from",
};

/// Rank 0's claim on the checkpoint folder before any training: it can be written, no other
/// training holds it (the lock, kept for the returned value's life), and the checkpoints in it are
/// of this dataset and of the model `model` (the flags' architecture). Checked before the "already
/// over" look, so a finished training of another model is refused, not reported as done.
pub fn claim(plan: &Plan, model: &GptConfig) -> Result<Option<FolderLock>> {
    if let Some(src) = &plan.init_from {
        check_init_source(src, plan.checkpoint_dir.as_deref(), TRAIN_REMEDY)?;
    }
    let Some(root) = &plan.checkpoint_dir else {
        return Ok(None);
    };
    checkpoint::check_writable(root)?;
    let held = lock::acquire(root)?;
    check_checkpoints(
        root,
        model,
        plan.batch.recipe,
        plan.dataset.as_ref(),
        TRAIN_REMEDY,
    )?;
    Ok(Some(held))
}

/// The checks of [`claim`] that read the folder, without taking it: `run` makes them before it
/// starts the training, to name its own flags in a refusal.
pub fn check_folder(
    root: &Path,
    init_from: Option<&Path>,
    model: &GptConfig,
    recipe: Recipe,
    dataset: &DatasetId,
    remedy: Remedy,
) -> Result<()> {
    if let Some(src) = init_from {
        check_init_source(src, Some(root), remedy)?;
    }
    check_checkpoints(root, model, recipe, Some(dataset), remedy)
}

/// The newest readable rolling checkpoint in `root` (what a resume reads) and best/ (what
/// `sample` reads) must be of this training.
fn check_checkpoints(
    root: &Path,
    model: &GptConfig,
    recipe: Recipe,
    dataset: Option<&DatasetId>,
    remedy: Remedy,
) -> Result<()> {
    if !root.is_dir() {
        return Ok(());
    }
    let newest = checkpoint::list(root)?
        .into_iter()
        .find_map(|(_, d)| checkpoint::load_manifest(&d).ok().map(|m| (d, m)));
    let best = root.join(checkpoint::BEST_DIR);
    let best = checkpoint::load_manifest(&best).ok().map(|m| (best, m));
    for (dir, m) in newest.into_iter().chain(best) {
        check_manifest(&dir, &m, model, recipe, dataset, remedy)?;
    }
    Ok(())
}

/// `--init-from` must name readable weights outside the new training's own folder.
fn check_init_source(src: &Path, root: Option<&Path>, remedy: Remedy) -> Result<()> {
    let dir = checkpoint::resolve_for_reading(src).map_err(|e| {
        crate::sys::error::UserError(format!("--init-from (CHARLM_INIT_FROM): {e:#}"))
    })?;
    if let Some(root) = root {
        let (dir, root) = (canonical(&dir), canonical(root));
        if dir.starts_with(&root) {
            user_bail!(
                "--init-from {} is inside the checkpoint folder {}: a new training from those \
                 weights needs a folder of its own; give {}",
                src.display(),
                root.display(),
                remedy.other_folder
            );
        }
    }
    Ok(())
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Refuses checkpoint `dir` (manifest `m`) unless it is of this training: the same dataset,
/// vocabulary, model and recipe.
fn check_manifest(
    dir: &Path,
    m: &Manifest,
    model: &GptConfig,
    recipe: Recipe,
    dataset: Option<&DatasetId>,
    remedy: Remedy,
) -> Result<()> {
    let root = dir.parent().unwrap_or(dir);
    let Remedy {
        other_folder,
        init_from,
    } = remedy;
    if let (Some(theirs), Some(ours)) = (&m.dataset, dataset) {
        if theirs.digest != ours.digest {
            user_bail!(
                "{} was trained on another dataset: {}; this run's --data is {}. Its val bpc and \
                 best/ were measured on that dataset's validation split, so it cannot go on here. \
                 Give this training {other_folder}, or start a new training from those weights, \
                 with its own best/, by adding {init_from} {} and {other_folder}",
                dir.display(),
                theirs.describe(),
                ours.describe(),
                root.display()
            );
        }
    }
    if let Some(theirs) = m
        .vocabulary
        .as_deref()
        .filter(|v| *v != checkpoint::vocabulary())
    {
        user_bail!(
            "{} was trained with the vocabulary {theirs:?}, this trainer's is {:?}: its weights \
             cannot be read by this model; give {other_folder}",
            dir.display(),
            checkpoint::vocabulary()
        );
    }
    let their_recipe = serde_json::from_value::<Batch>(m.settings.clone())
        .map_or(Recipe::before_recipes(), |b| b.recipe);
    let mut diffs = Vec::new();
    let theirs = &m.model;
    if theirs.depth != model.depth {
        diffs.push(format!(
            "--depth {} (this run: {})",
            theirs.depth, model.depth
        ));
    }
    if theirs.seq_len != model.seq_len {
        diffs.push(format!(
            "--seq-len {} (this run: {})",
            theirs.seq_len, model.seq_len
        ));
    }
    if their_recipe != recipe {
        diffs.push(format!(
            "--recipe {} (this run: {})",
            their_recipe.name(),
            recipe.name()
        ));
    } else if (theirs.rope_base, theirs.scalars) != (model.rope_base, model.scalars) {
        diffs.push(format!(
            "rotary base {} and per-layer scalars {} (this run: {} and {})",
            theirs.rope_base, theirs.scalars, model.rope_base, model.scalars
        ));
    }
    if theirs.vocab_size != model.vocab_size {
        diffs.push(format!(
            "a vocabulary of {} tokens (this run: {})",
            theirs.vocab_size, model.vocab_size
        ));
    }
    if !diffs.is_empty() {
        // The weights fit another sequence length: only the data position does not.
        let weights_fit = theirs.seq_len != model.seq_len
            && (
                theirs.depth,
                theirs.vocab_size,
                theirs.rope_base,
                theirs.scalars,
            ) == (
                model.depth,
                model.vocab_size,
                model.rope_base,
                model.scalars,
            );
        let init = if weights_fit {
            format!(
                ", or start a new training from its weights with {init_from} {} and \
                 {other_folder}",
                root.display()
            )
        } else {
            String::new()
        };
        user_bail!(
            "{} holds another model than this run asks for: {}. A checkpoint resumes only into \
             the model and recipe it was trained with, whatever the budget: resume it with the \
             same flags, or give this training {other_folder}{init}",
            dir.display(),
            diffs.join(", ")
        );
    }
    Ok(())
}

/// The summary of a training that is already over: its newest checkpoint spent the *current*
/// budget (a raised budget continues training), or it stopped early at that checkpoint. A
/// restarted pod must not train past its end.
pub fn finished_summary(plan: &Plan) -> Result<Option<ProgressReport>> {
    let Some(root) = &plan.checkpoint_dir else {
        return Ok(None);
    };
    let Some((_, newest)) = checkpoint::list(root)?.into_iter().next() else {
        return Ok(None);
    };
    let Ok(m) = checkpoint::load_manifest(&newest) else {
        return Ok(None);
    };
    let recorded = checkpoint::read_complete(root)?
        .and_then(|v| serde_json::from_value::<ProgressReport>(v).ok())
        .filter(|p| p.step == m.step);
    let spent = plan.budget.fraction(m.step, m.elapsed_s) >= 1.0;
    let stopped_early = recorded
        .as_ref()
        .is_some_and(|p| p.stop_reason.as_deref() == Some(StopReason::EarlyStop.as_str()));
    if !spent && !stopped_early {
        return Ok(None);
    }
    eprintln!(
        "training in {} is already over (step {}, {:.0} s trained{}); nothing to do",
        root.display(),
        m.step,
        m.elapsed_s,
        if stopped_early { ", stopped early" } else { "" }
    );
    if let Some(p) = recorded {
        return Ok(Some(p));
    }
    let best = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)).ok();
    Ok(Some(ProgressReport {
        step: m.step,
        total_steps_estimate: Some(m.step),
        epoch: m.epoch,
        val_bpc: m.val_bpc,
        best_val_bpc: best.as_ref().and_then(|b| b.val_bpc),
        best_step: best.map(|b| b.step),
        elapsed_s: m.elapsed_s,
        eta_s: Some(0.0),
        checkpoint: Some(newest.display().to_string()),
        world_size: m.world_size as u64,
        complete: true,
        stop_reason: Some(StopReason::Budget.as_str().to_string()),
        ..Default::default()
    }))
}

/// Loads the newest good checkpoint into the engine and state (rank 0, which then sends the
/// state to the others); returns its directory. Damaged checkpoints it passed over on the way
/// land in `set_aside`. Without a checkpoint, `--init-from`'s weights start a new training (and
/// `None` is returned: nothing was resumed).
pub fn restore(
    plan: &Plan,
    engine: &mut Engine,
    state: &mut RunState,
    set_aside: &mut Vec<charlm_contract::DamagedCheckpoint>,
) -> Result<Option<PathBuf>> {
    let loaded = match &plan.checkpoint_dir {
        Some(root) => checkpoint::load_latest(root)?,
        None => {
            eprintln!("warning: no --checkpoint-dir: this run cannot be resumed");
            None
        }
    };
    let Some(loaded) = loaded else {
        if let Some(src) = &plan.init_from {
            init_from(src, engine, state)?;
        }
        return Ok(None);
    };
    let m = &loaded.manifest;
    // An earlier checkpoint than the one `claim` looked at may be the one read (a newer one
    // was damaged); it is checked alike.
    check_manifest(
        &loaded.dir,
        m,
        &engine.model.config,
        plan.batch.recipe,
        plan.dataset.as_ref(),
        TRAIN_REMEDY,
    )?;
    if let Some(src) = &plan.init_from {
        eprintln!(
            "note: --init-from {} is not used: {} holds this training's own checkpoints, which \
             it resumes",
            src.display(),
            plan.checkpoint_dir
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        );
    }
    if m.dataset.is_none() {
        eprintln!(
            "note: {} records no dataset (it predates that record): resuming it on --data \
             without checking that it is the same dataset",
            loaded.dir.display()
        );
    }
    if let Ok(old) = serde_json::from_value::<ScheduleInputs>(m.settings.clone()) {
        let new = plan.schedule_inputs();
        if let Some(note) = schedule_change(&old, &new, &plan.schedule, m.step, m.elapsed_s) {
            eprintln!("note: {note}");
        }
    }
    if let Ok(old) = serde_json::from_value::<Batch>(m.settings.clone()) {
        if old.total_batch_size != plan.batch.total_batch_size || old.seed != plan.batch.seed {
            eprintln!(
                "warning: resuming with total batch {} and seed {} (the checkpoint had {} and {}): \
                 the data order changes",
                plan.batch.total_batch_size, plan.batch.seed, old.total_batch_size, old.seed
            );
        }
    }
    engine.load(&loaded.model, &loaded.optimizer, m.adamw_step)?;
    state.step = m.step;
    state.elapsed_s = m.elapsed_s;
    state.val_bpc = m.val_bpc;
    state.evals_since_best = m.evals_since_best;
    state.overfit_evals = m.overfit_evals;
    state.init_from = m.init_from.clone();
    if let Some(root) = &plan.checkpoint_dir {
        if let Ok(best) = checkpoint::load_manifest(&root.join(checkpoint::BEST_DIR)) {
            state.best = best.val_bpc.map(|v| (v, best.step));
        }
    }
    *set_aside = loaded.set_aside;
    Ok(Some(loaded.dir))
}

/// A new training from another one's weights: step 0, a fresh optimizer, schedule and best/.
/// The architecture must match (the sequence length and the dataset may differ).
fn init_from(src: &Path, engine: &mut Engine, state: &mut RunState) -> Result<()> {
    let dir = checkpoint::resolve_for_reading(src)?;
    let loaded = checkpoint::load_model(&dir)?;
    let (theirs, ours) = (&loaded.manifest.model, engine.model.config);
    let arch = |c: &GptConfig| (c.depth, c.vocab_size, c.rope_base, c.scalars);
    if arch(theirs) != arch(&ours) {
        user_bail!(
            "--init-from {} holds a depth-{} model (rotary base {}, per-layer scalars {}), but \
             this run builds depth {} (rotary base {}, per-layer scalars {}): weights load only \
             into the same architecture; give --depth {} and the recipe it was trained with",
            dir.display(),
            theirs.depth,
            theirs.rope_base,
            theirs.scalars,
            ours.depth,
            ours.rope_base,
            ours.scalars,
            theirs.depth
        );
    }
    engine.load_weights(&loaded.model)?;
    let m = &loaded.manifest;
    eprintln!(
        "initialised from {} (step {} of its training{}): a new training from step 0, with a \
         fresh optimizer and schedule and its own best/",
        dir.display(),
        m.step,
        m.dataset
            .as_ref()
            .map_or(String::new(), |d| format!(", on {}", d.path))
    );
    state.init_from = Some(InitFrom {
        path: dir.display().to_string(),
        step: m.step,
        dataset: m.dataset.clone(),
    });
    Ok(())
}
