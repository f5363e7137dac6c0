//! Who may create a training, as a namespace user of a shared cluster: the chart's ClusterRoles
//! aggregate into the built-in `edit` and `view` (the controller-manager's aggregation controller
//! does it), so a ServiceAccount bound to `edit` in one namespace creates, suspends and deletes a
//! training there, one bound to `view` reads it and is refused any change, and neither reaches
//! another namespace. Needs `e2e/controlplane/up`.

use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use charlm_api::{CharLMTraining, Phase};
use charlm_e2e::cluster::{client_from, create_namespace, token_kubeconfig};
use charlm_e2e::specs::small_cpu;
use charlm_e2e::training_env::TestEnv;

const MINUTE: Duration = Duration::from_secs(60);

/// A ServiceAccount `name` in `ns`, bound there to the ClusterRole `role` by a RoleBinding, and a
/// client that authenticates as it.
async fn user(env: &TestEnv, ns: &str, name: &str, role: &str) -> Client {
    let sas: Api<ServiceAccount> = Api::namespaced(env.admin.clone(), ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(env.admin.clone(), ns);
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let kubeconfig = token_kubeconfig(&env.admin, ns, name, &env.dir)
        .await
        .unwrap();
    client_from(&kubeconfig).await.unwrap()
}

/// The API server's answer to a request: Ok, or the HTTP code of its refusal.
fn code<T>(r: Result<T, kube::Error>) -> Result<T, u16> {
    r.map_err(|e| match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API answer: {other}"),
    })
}

fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match code(r) {
        Err(403) => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_creates_suspends_and_deletes_trainings_in_its_namespace_and_view_only_reads() {
    let mut env = TestEnv::new("rbac").await;
    let other = create_namespace(&env.admin, "rbac-other").await.unwrap();
    env.start_operator("operator-1").await;
    let ns = env.ns.clone();

    // The aggregation controller copies the chart's rules into the built-in roles.
    let roles: Api<ClusterRole> = Api::all(env.admin.clone());
    for role in ["admin", "edit", "view"] {
        env.wait(
            &format!("ClusterRole {role} to aggregate charlm.dev rules"),
            MINUTE,
            || {
                let roles = roles.clone();
                async move {
                    let r = roles.get(role).await.map_err(|e| e.to_string())?;
                    let has = r.rules.unwrap_or_default().iter().any(|rule| {
                        rule.api_groups
                            .as_ref()
                            .is_some_and(|g| g.iter().any(|g| g == "charlm.dev"))
                    });
                    Ok(has.then_some(()))
                }
            },
        )
        .await;
    }

    let editor = user(&env, &ns, "editor", "edit").await;
    let viewer = user(&env, &ns, "viewer", "view").await;
    let as_editor: Api<CharLMTraining> = Api::namespaced(editor.clone(), &ns);
    let as_viewer: Api<CharLMTraining> = Api::namespaced(viewer.clone(), &ns);
    let manifest: CharLMTraining = serde_json::from_value(small_cpu("shared", 1)).unwrap();

    // `edit` creates a training in its namespace; the operator runs it.
    as_editor
        .create(&PostParams::default(), &manifest)
        .await
        .expect("a user bound to edit creates a training in its namespace");
    env.wait_phase("shared", Phase::Running, MINUTE).await;

    // `view` reads it, its status included, and may change nothing.
    let seen = as_viewer
        .get("shared")
        .await
        .expect("view reads a training");
    assert!(seen.status.is_some());
    assert_eq!(
        as_viewer
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    as_viewer
        .get_status("shared")
        .await
        .expect("view reads the status");
    let mut copy = manifest.clone();
    copy.metadata.name = Some("from-viewer".into());
    forbidden(
        "view creating a training",
        as_viewer.create(&PostParams::default(), &copy).await,
    );
    let suspend = Patch::Merge(json!({"spec": {"suspend": true}}));
    forbidden(
        "view suspending a training",
        as_viewer
            .patch("shared", &PatchParams::default(), &suspend)
            .await,
    );
    forbidden(
        "view deleting a training",
        as_viewer.delete("shared", &DeleteParams::default()).await,
    );

    // `edit` suspends it (and may not write the status, which is the operator's).
    as_editor
        .patch("shared", &PatchParams::default(), &suspend)
        .await
        .expect("edit suspends a training");
    env.wait_phase("shared", Phase::Suspended, MINUTE).await;
    forbidden(
        "edit writing a training's status",
        as_editor
            .patch_status(
                "shared",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
            )
            .await,
    );

    // Neither reaches another namespace.
    for (who, client) in [("edit", &editor), ("view", &viewer)] {
        let elsewhere: Api<CharLMTraining> = Api::namespaced(client.clone(), &other);
        forbidden(
            &format!("{who} listing trainings in {other}"),
            elsewhere.list(&ListParams::default()).await,
        );
        forbidden(
            &format!("{who} creating a training in {other}"),
            elsewhere.create(&PostParams::default(), &manifest).await,
        );
        let everywhere: Api<CharLMTraining> = Api::all(client.clone());
        forbidden(
            &format!("{who} listing trainings in all namespaces"),
            everywhere.list(&ListParams::default()).await,
        );
    }

    // `edit` deletes it; the operator's finalizer lets it go.
    as_editor
        .delete("shared", &DeleteParams::default())
        .await
        .expect("edit deletes a training");
    env.wait("the training to be gone", MINUTE, || async {
        match code(env.trainings().get("shared").await) {
            Err(404) => Ok(Some(())),
            Ok(t) => Err(format!("still there: {:?}", t.metadata.deletion_timestamp)),
            Err(c) => Err(format!("HTTP {c}")),
        }
    })
    .await;

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.admin.clone());
    let _ = namespaces.delete(&other, &DeleteParams::default()).await;
    env.finish().await;
}
