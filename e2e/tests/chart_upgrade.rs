//! CRD upgrades through Helm, on the control plane: the chart renders the CRD from templates/, so
//! a `helm upgrade` to a chart whose CRD has a new field brings the field to the cluster (Helm
//! never upgrades a chart's crds/ folder), `helm uninstall` keeps the CRD and the trainings
//! (`helm.sh/resource-policy: keep`), and the release installs again over it. The install's
//! notes carry a first training the API server accepts. One test in a binary of its own: it
//! changes the cluster-wide CRD, which no other test may see meanwhile (cargo runs test binaries
//! one after another). Needs `e2e/controlplane/up`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use charlm_e2e::cluster::{
    self, admin_client, create_namespace, install_chart, repo_root, run_dir, tool, CHART_NAMESPACE,
    CHART_RELEASE,
};

const CRD: &str = "charlmtrainings.charlm.dev";
const CRD_FILE: &str = "files/charlmtrainings.charlm.dev.yaml";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The chart as a release before `spec.tensorboard` existed: the same chart, version 0.1.0,
/// whose CRD lacks that field.
fn older_chart(dir: &Path) -> PathBuf {
    let chart = dir.join("charlm-operator");
    let _ = std::fs::remove_dir_all(&chart);
    copy_dir(&repo_root().join("charts/charlm-operator"), &chart);
    let path = chart.join(CRD_FILE);
    let mut crd: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(spec["properties"]
        .as_object_mut()
        .unwrap()
        .remove("tensorboard")
        .is_some());
    std::fs::write(&path, serde_norway::to_string(&crd).unwrap()).unwrap();
    let meta = chart.join("Chart.yaml");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("version: 0.2.0", "version: 0.1.0")).unwrap();
    chart
}

fn helm_upgrade(chart: &Path) -> String {
    cluster::helm_upgrade(chart)
        .unwrap_or_else(|e| panic!("helm upgrade to {}: {e}", chart.display()))
}

fn live_crd() -> Value {
    let out = tool("kubectl", &["get", "crd", CRD, "-o", "json"]).unwrap();
    serde_json::from_str(&out).unwrap()
}

fn crd_has_tensorboard(crd: &Value) -> bool {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["tensorboard"]
        .is_object()
}

/// Waits until the API server serves the CRD as stored (it reloads a changed schema a moment after
/// the write): a training applied with `tensorboard` keeps it exactly when the schema has it.
fn training_keeps_tensorboard(ns: &str, name: &str, expected: bool) {
    let manifest = format!(
        r#"{{"apiVersion": "charlm.dev/v1alpha1", "kind": "CharLMTraining",
            "metadata": {{"name": "{name}"}},
            "spec": {{"depth": 2, "gpus": 0, "maxSteps": 10, "tensorboard": true,
                      "dataset": {{"synthetic": {{"chars": 100000}}}}}}}}"#
    );
    let file = run_dir().join(format!("e2e/{ns}-{name}.json"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, manifest).unwrap();
    let mut last = String::new();
    for _ in 0..40 {
        // A dry run: the stored object as the API server would keep it, pruning included.
        let out = tool(
            "kubectl",
            &[
                "create",
                "-n",
                ns,
                "--dry-run=server",
                // kubectl asks for strict field validation, which refuses the unknown field
                // rather than show that the old schema prunes it.
                "--validate=ignore",
                "-o",
                "json",
                "-f",
                file.to_str().unwrap(),
            ],
        )
        .unwrap();
        let stored: Value = serde_json::from_str(&out).unwrap();
        let kept = stored["spec"]["tensorboard"] == Value::Bool(true);
        if kept == expected {
            return;
        }
        last = stored["spec"].to_string();
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    panic!("spec.tensorboard kept: expected {expected}; the API server stored spec {last}");
}

/// The training the notes print, between `kubectl apply -f - <<'YAML'` and `YAML`.
fn notes_training(helm_output: &str) -> String {
    let notes = helm_output
        .split("NOTES:")
        .nth(1)
        .unwrap_or_else(|| panic!("no NOTES in helm's output:\n{helm_output}"));
    assert!(
        !notes.contains("examples/"),
        "the notes point at files a chart from a repository does not have:\n{notes}"
    );
    let start = notes
        .find("<<'YAML'\n")
        .unwrap_or_else(|| panic!("no training in the notes:\n{notes}"))
        + "<<'YAML'\n".len();
    let end = start + notes[start..].find("\nYAML").expect("the heredoc ends");
    notes[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_brings_a_new_crd_field_and_uninstall_keeps_the_crd() {
    let admin = admin_client().await;
    tokio::task::spawn_blocking(install_chart).await.unwrap();
    let ns = create_namespace(&admin, "chart-upgrade").await.unwrap();
    let dir = run_dir().join("e2e").join(&ns);
    let current = repo_root().join("charts/charlm-operator");

    // A cluster on the older chart: its CRD has no spec.tensorboard, and the API server drops the
    // field from what it stores.
    let older = older_chart(&dir);
    helm_upgrade(&older);
    let crd = live_crd();
    assert!(
        !crd_has_tensorboard(&crd),
        "helm upgrade to the older chart left the CRD as it was: Helm does not manage it"
    );
    training_keeps_tensorboard(&ns, "before", false);

    // `helm upgrade` to this chart: the field reaches the cluster.
    let output = helm_upgrade(&current);
    let crd = live_crd();
    assert!(
        crd_has_tensorboard(&crd),
        "helm upgrade did not bring spec.tensorboard to the cluster's CRD"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["meta.helm.sh/release-name"],
        CHART_RELEASE
    );
    training_keeps_tensorboard(&ns, "after", true);

    // The notes' first training needs no checkout, and the API server takes it as it is.
    let first = notes_training(&output);
    let file = dir.join("first-training.yaml");
    std::fs::write(&file, &first).unwrap();
    tool(
        "kubectl",
        &[
            "apply",
            "-n",
            &ns,
            "--dry-run=server",
            "-f",
            file.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("the notes' training is refused: {e}\n{first}"));

    // Uninstall keeps the CRD and a training in it; installing again takes the CRD over.
    tool(
        "kubectl",
        &["apply", "-n", &ns, "-f", file.to_str().unwrap()],
    )
    .unwrap();
    tool(
        "helm",
        &["uninstall", CHART_RELEASE, "-n", CHART_NAMESPACE, "--wait"],
    )
    .unwrap();
    assert!(
        crd_has_tensorboard(&live_crd()),
        "the CRD went with the release"
    );
    let kept = tool("kubectl", &["get", "clt", "-n", &ns, "-o", "name"]).unwrap();
    assert!(kept.contains("charlm-first"), "{kept}");
    helm_upgrade(&current);

    // Nothing runs the training (no operator here): its finalizer is not there to wait for.
    let _ = Command::new(charlm_e2e::cluster::bin_dir().join("kubectl"))
        .env("KUBECONFIG", charlm_e2e::cluster::kubeconfig_path())
        .args(["delete", "namespace", &ns, "--wait=false"])
        .output();
}
