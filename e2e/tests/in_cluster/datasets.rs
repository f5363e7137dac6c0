//! Cases 2 to 4: PVC datasets and checkpoint claims the trainer cannot use fail once, naming the place and the fix.

use super::*;

/// Writes two files, `b.txt` with a stray `x` at line 3, column 5, and prints their checksums.
const WRITE_CORPUS: &str = "mkdir -p /data/corpus && cd /data/corpus && \
    printf '12+34\\n46\\n\\n7-3\\n4\\n\\n' >a.txt && printf '1+1\\n2\\n7.8Hx9\\n' >b.txt && \
    sha256sum a.txt b.txt";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_stray_character_on_the_pvc_fails_naming_its_place_and_leaves_the_files() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-bad-file").await;
    case.claim("texts").await;
    let (phase, before) = case
        .run_script("writer", "texts", WRITE_CORPUS, false)
        .await;
    assert_eq!(phase, "Succeeded", "{}", case.report(&before).await);

    case.apply(&pvc_dataset("stray", "texts", "corpus")).await;
    let failed = case.wait_phase("stray", Phase::Failed, 3 * MINUTE).await;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("b.txt:3:5"),
        "{}",
        case.report(&format!("the failure does not name b.txt:3:5: {message}"))
            .await
    );
    assert!(case.workers("stray").await.iter().all(|p| {
        // No new attempt after bad input: the one pod ran its prepare step and stopped.
        p.labels().get("charlm.dev/attempt").map(String::as_str) == Some("0")
    }));

    let (phase, after) = case
        .run_script(
            "reader",
            "texts",
            "cd /data/corpus && sha256sum a.txt b.txt && ls",
            true,
        )
        .await;
    assert_eq!(phase, "Succeeded", "{after}");
    for line in before.lines() {
        assert!(
            after.contains(line),
            "the claim's files changed: before\n{before}\nafter\n{after}"
        );
    }
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_dataset_the_trainer_cannot_read_fails_naming_the_file_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-unreadable").await;
    case.claim("texts").await;
    let script = format!("{WRITE_CORPUS} && chmod 000 b.txt");
    let (phase, log) = case.run_script("writer", "texts", &script, false).await;
    assert_eq!(phase, "Succeeded", "{log}");

    case.apply(&pvc_dataset("locked", "texts", "corpus")).await;
    let failed = case.wait_phase("locked", Phase::Failed, 3 * MINUTE).await;
    let message = failed
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("b.txt") && message.contains("1000"),
        "{}",
        case.report(&format!(
            "the failure should name the unreadable file and uid 1000 (the fix): {message}"
        ))
        .await
    );
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

/// A PVC dataset folder that holds no `.txt` file (here a stray `notes.md`): `Failed` at the
/// prepare step, naming the folder and what to put there, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_dataset_folder_without_text_files_fails_naming_the_folder_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("pvc-empty").await;
    case.claim("texts").await;
    let script = "mkdir -p /data/corpus && echo 'to do' >/data/corpus/notes.md";
    let (phase, log) = case.run_script("writer", "texts", script, false).await;
    assert_eq!(phase, "Succeeded", "{log}");

    case.apply(&pvc_dataset("empty", "texts", "corpus")).await;
    let failed = case.wait_phase("empty", Phase::Failed, 3 * MINUTE).await;
    let status = failed.status.clone().unwrap_or_default();
    let message = status.message.clone().unwrap_or_default();
    let report = case.report(&message).await;
    assert!(
        message.contains("no .txt files under /dataset/corpus")
            && message.contains("put the dataset's text files there"),
        "the failure should name the folder and the fix: {report}"
    );
    assert_eq!(status.restarts, 0, "bad input is not retried: {report}");
    eprintln!("failed as expected: {message}");
    case.finish().await;
}

/// A checkpoint claim that arrives owned by root, mode 0755 (storage whose driver does not apply
/// the pod's fsGroup, here a hostPath volume the kubelet creates): the trainer finds it before it
/// trains, and the training fails once, naming the directory, the uid and gid, and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster with the chart and images: e2e/kind.sh runs it"]
async fn a_checkpoint_claim_of_another_owner_fails_naming_the_uid_and_the_fix() {
    let _serial = SERIAL.lock().await;
    let case = Case::start("claim-owner").await;
    let name = "owner";
    // A volume bound in advance to the claim the operator will make (`<name>-checkpoints`), of a
    // class no provisioner serves; under /tmp/hostpath_pv/ so that the plane's `down` (and the
    // controller-manager's hostPath deleter) remove its directory.
    let class = format!("{}-root-owned", case.ns);
    let pv_name = format!("{}-checkpoints", case.ns);
    let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "256Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": class,
            "hostPath": {"path": format!("/tmp/hostpath_pv/{pv_name}"), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": case.ns, "name": format!("{name}-checkpoints")}
        }
    }))
    .unwrap();
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(case.client.clone());
    pvs.create(&PostParams::default(), &pv)
        .await
        .unwrap_or_else(|e| panic!("creating PersistentVolume {pv_name}: {e}"));
    let mut manifest = tiny(name, 1);
    manifest["spec"]["checkpoint"]["storageClassName"] = json!(class);
    case.apply(&manifest).await;
    let failed = case.wait_phase(name, Phase::Failed, 4 * MINUTE).await;
    let status = failed.status.clone().unwrap();
    let message = status.message.clone().unwrap_or_default();
    let report = case.report(&message).await;
    for want in [
        "--checkpoint-dir /checkpoints",
        "cannot be written",
        "uid 1000, gid 1000",
        "owned by uid 1000, or group-writable for gid 1000",
    ] {
        assert!(
            message.contains(want),
            "no {want:?} in the message: {report}"
        );
    }
    let failed_condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap_or_else(|| panic!("no Failed condition: {report}"));
    assert_eq!(failed_condition.reason, "InvalidInput", "{report}");
    assert_eq!(status.restarts, 0, "bad input is not retried: {report}");
    case.trainings
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    case.finish().await;
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
}
