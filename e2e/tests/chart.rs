//! The Helm chart offline, with the chart's own `helm` (`e2e/controlplane/build`): its values
//! schema refuses what the chart cannot use and takes what it can; its README's values table is
//! the one values.yaml and values.schema.json make; names follow nameOverride/fullnameOverride;
//! the operator's pod settings, its PodDisruptionBudget, the roles aggregated into admin/edit/view
//! and the CRD (rendered from templates/, so `helm upgrade` upgrades it) render as documented.
//! The same on a control plane: e2e/tests/chart_upgrade.rs and e2e/tests/rbac.rs.

use std::path::PathBuf;

use serde_json::{json, Value};

use charlm_e2e::cluster::{repo_root, run_dir, tool};

fn chart() -> PathBuf {
    repo_root().join("charts/charlm-operator")
}

fn args<'a>(command: &'a str, chart: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![command];
    if command == "template" {
        a.push("t");
    }
    a.extend([chart, "-n", "charlm-system"]);
    if command == "template" {
        a.extend(["--kube-version", "1.35.0"]);
    }
    a.extend(extra);
    a
}

/// `helm template` of the chart with `extra` arguments: the documents, or helm's refusal.
fn render(extra: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart();
    let out = tool("helm", &args("template", chart.to_str().unwrap(), extra))
        .map_err(|e| e.to_string())?;
    Ok(out
        .split("\n---")
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
        .filter(|d| d.is_object())
        .collect())
}

fn lint(extra: &[&str]) -> Result<String, String> {
    let chart = chart();
    tool("helm", &args("lint", chart.to_str().unwrap(), extra)).map_err(|e| e.to_string())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn one<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(docs, kind, name).unwrap_or_else(|| {
        let all: Vec<String> = docs
            .iter()
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .collect();
        panic!("no {kind} {name} among {all:?}")
    })
}

#[test]
fn the_values_schema_refuses_misspelt_keys_wrong_types_and_out_of_range_values() {
    // Good values, beyond the defaults: each passes lint and renders.
    let good = run_dir().join("e2e/chart-good-values.yaml");
    std::fs::create_dir_all(good.parent().unwrap()).unwrap();
    std::fs::write(
        &good,
        r#"replicaCount: 2
image: {repository: registry.example/charlm-operator, tag: "1.2.3", pullPolicy: Always}
trainerImage: {repository: registry.example/charlm-trainer, tag: dev, pullPolicy: Never}
logLevel: info,charlm_operator=debug
pricePerGpuHour: 2.5
progressNetworks: [10.244.0.0/16, "fd00::/8"]
metrics: {port: 9443, service: {type: NodePort}, serviceMonitor: {enabled: true, interval: 1m30s, labels: {release: prom}}}
grafana: {dashboard: {enabled: true, labelValue: 1}}
networkPolicy: {metricsNamespaces: [monitoring]}
crds: {install: false}
podDisruptionBudget: {minAvailable: 1}
priorityClassName: system-cluster-critical
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: CriticalAddonsOnly, operator: Exists}]
resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: 1, memory: 512Mi}}
"#,
    )
    .unwrap();
    let good = good.to_str().unwrap();
    for extra in [&[][..], &["-f", good][..]] {
        lint(extra).unwrap_or_else(|e| panic!("helm lint {extra:?} failed: {e}"));
        render(extra).unwrap_or_else(|e| panic!("helm template {extra:?} failed: {e}"));
    }

    // Bad values: refused before anything renders, naming the key.
    let bad: [(&str, &str); 17] = [
        ("replicas=2", "additional properties 'replicas' not allowed"),
        ("replicaCount=-1", "/replicaCount"),
        ("replicaCount=two", "/replicaCount"),
        ("image.tagg=dev", "additional properties 'tagg' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("trainerImage.repository=", "/trainerImage/repository"),
        ("metrics.port=70000", "/metrics/port"),
        ("metrics.service.type=Ingress", "/metrics/service/type"),
        (
            "metrics.serviceMonitor.interval=soon",
            "/metrics/serviceMonitor/interval",
        ),
        ("pricePerGpuHour=-1", "/pricePerGpuHour"),
        ("pricePerGpuHour=cheap", "/pricePerGpuHour"),
        ("logLevel=verbose", "/logLevel"),
        (
            "leaderElection.leaseDurationSeconds=1",
            "/leaderElection/leaseDurationSeconds",
        ),
        ("progressNetworks={10.0.0.0}", "/progressNetworks/0"),
        (
            "networkPolicy.metricsNamespaces={Monitoring}",
            "/networkPolicy/metricsNamespaces/0",
        ),
        ("crds.install=maybe", "/crds/install"),
        (
            "podDisruptionBudget.minAvailable=-1",
            "/podDisruptionBudget/minAvailable",
        ),
    ];
    for (set, expected) in bad {
        for (what, result) in [
            ("helm lint", lint(&["--set", set]).map(|_| ())),
            ("helm template", render(&["--set", set]).map(|_| ())),
        ] {
            match result {
                Ok(()) => panic!("{what} --set {set} passed; the schema should refuse it"),
                Err(e) => assert!(
                    e.contains(expected) && e.contains("schema"),
                    "{what} --set {set}: the refusal does not name {expected:?}:\n{e}"
                ),
            }
        }
    }
}

/// The leaves of values.yaml, in its order, with their schema: a key whose schema has
/// `properties` is descended into, any other is one row.
fn value_rows(
    values: &serde_norway::Mapping,
    schema: &Value,
    prefix: &str,
    rows: &mut Vec<[String; 4]>,
    problems: &mut Vec<String>,
) {
    let props = &schema["properties"];
    for (key, value) in values {
        let key = key.as_str().expect("values.yaml keys are strings");
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(s) = props.get(key) else {
            problems.push(format!(
                "values.yaml has {path}, values.schema.json does not describe it"
            ));
            continue;
        };
        match value {
            serde_norway::Value::Mapping(m) if s["properties"].is_object() => {
                value_rows(m, s, &path, rows, problems)
            }
            _ => {
                let ty = match &s["type"] {
                    Value::String(t) => t.clone(),
                    Value::Array(ts) => ts
                        .iter()
                        .map(|t| t.as_str().unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(" or "),
                    _ => "any".to_string(),
                };
                let default = serde_json::to_string(&serde_json::to_value(value).unwrap()).unwrap();
                let description = s["description"].as_str().unwrap_or_default();
                if description.is_empty() {
                    problems.push(format!("values.schema.json has no description of {path}"));
                }
                rows.push([path, ty, default, description.to_string()]);
            }
        }
    }
    if let Some(described) = props.as_object() {
        for key in described.keys() {
            // `global` is Helm's, never in values.yaml.
            let helms = prefix.is_empty() && key == "global";
            if !helms && !values.contains_key(key.as_str()) {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                problems.push(format!(
                    "values.schema.json describes {path}, values.yaml has no default for it"
                ));
            }
        }
    }
}

#[test]
fn the_readme_values_table_is_the_one_values_yaml_and_the_schema_make() {
    let dir = chart();
    let values: serde_norway::Mapping =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("values.yaml")).unwrap()).unwrap();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).unwrap())
            .unwrap();
    let (mut rows, mut problems) = (Vec::new(), Vec::new());
    value_rows(&values, &schema, "", &mut rows, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(rows.len() > 50, "only {} values", rows.len());
    let mut table = String::from("| Key | Type | Default | Description |\n|---|---|---|---|\n");
    for [key, ty, default, description] in &rows {
        table.push_str(&format!(
            "| `{key}` | {ty} | `{default}` | {description} |\n"
        ));
    }

    let readme_path = dir.join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (start, end) = ("<!-- values:start -->\n", "<!-- values:end -->");
    let a = readme
        .find(start)
        .expect("README.md has <!-- values:start -->")
        + start.len();
    let b = readme.find(end).expect("README.md has <!-- values:end -->");
    if std::env::var_os("CHARLM_BLESS").is_some() {
        let updated = format!("{}{table}{}", &readme[..a], &readme[b..]);
        std::fs::write(&readme_path, updated).unwrap();
        return;
    }
    assert!(
        readme[a..b] == table,
        "charts/charlm-operator/README.md's values table is stale; rewrite it with \
         `CHARLM_BLESS=1 cargo test -p charlm-e2e --test chart`. It should read:\n{table}"
    );
}

#[test]
fn names_follow_name_override_and_fullname_override() {
    let docs = render(&[]).unwrap();
    one(&docs, "Deployment", "t-charlm-operator");
    one(&docs, "Service", "t-charlm-operator-metrics");

    let docs = render(&["--set", "nameOverride=trainer-op"]).unwrap();
    let d = one(&docs, "Deployment", "t-trainer-op");
    assert_eq!(
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "trainer-op"
    );
    one(&docs, "ServiceAccount", "t-trainer-op");
    one(&docs, "ClusterRole", "t-trainer-op-edit");

    let docs = render(&["--set", "fullnameOverride=charlm"]).unwrap();
    for (kind, name) in [
        ("Deployment", "charlm"),
        ("ServiceAccount", "charlm"),
        ("ClusterRole", "charlm"),
        ("ClusterRoleBinding", "charlm"),
        ("Service", "charlm-metrics"),
        ("ClusterRole", "charlm-edit"),
        ("ClusterRole", "charlm-view"),
    ] {
        one(&docs, kind, name);
    }
    let d = one(&docs, "Deployment", "charlm");
    assert_eq!(
        d["spec"]["template"]["spec"]["serviceAccountName"],
        "charlm"
    );
}

#[test]
fn the_operator_pod_takes_its_security_context_resources_placement_and_priority() {
    let deployment = |docs: &[Value]| one(docs, "Deployment", "t-charlm-operator").clone();
    // Defaults: the restricted profile, as before the values existed.
    let d = deployment(&render(&[]).unwrap());
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        pod["containers"][0]["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert!(pod.get("priorityClassName").is_none() && pod.get("nodeSelector").is_none());

    let d = deployment(
        &render(&[
            "--set",
            "podSecurityContext.runAsUser=1001",
            "--set",
            "podSecurityContext.fsGroup=1001",
            "--set",
            "securityContext.readOnlyRootFilesystem=false",
            "--set",
            "resources.limits.memory=1Gi",
            "--set",
            "nodeSelector.pool=system",
            "--set",
            "tolerations[0].key=dedicated",
            "--set",
            "tolerations[0].operator=Exists",
            "--set",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=zone",
            "--set",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
            "--set",
            "priorityClassName=system-cluster-critical",
        ])
        .unwrap(),
    );
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 1001);
    assert_eq!(pod["securityContext"]["fsGroup"], 1001);
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"], true,
        "merged with the defaults"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], false);
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(pod["nodeSelector"], json!({"pool": "system"}));
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "dedicated", "operator": "Exists"}])
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
        "zone"
    );
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
}

#[test]
fn a_pod_disruption_budget_comes_with_more_than_one_replica() {
    let pdbs = |docs: &[Value]| {
        docs.iter()
            .filter(|d| d["kind"] == "PodDisruptionBudget")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(pdbs(&render(&[]).unwrap()).is_empty(), "one replica: none");
    let docs = render(&["--set", "replicaCount=3"]).unwrap();
    let pdb = pdbs(&docs);
    assert_eq!(pdb.len(), 1);
    assert_eq!(pdb[0]["metadata"]["name"], "t-charlm-operator");
    assert_eq!(pdb[0]["spec"]["minAvailable"], 1);
    let deployment = one(&docs, "Deployment", "t-charlm-operator");
    assert_eq!(
        pdb[0]["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert!(pdbs(
        &render(&[
            "--set",
            "replicaCount=3",
            "--set",
            "podDisruptionBudget.enabled=false"
        ])
        .unwrap()
    )
    .is_empty());
    let e = render(&[
        "--set",
        "replicaCount=2",
        "--set",
        "podDisruptionBudget.minAvailable=2",
    ])
    .unwrap_err();
    assert!(
        e.contains("podDisruptionBudget.minAvailable (2) must be below replicaCount (2)"),
        "{e}"
    );
}

#[test]
fn the_user_roles_aggregate_into_admin_edit_and_view() {
    let docs = render(&[]).unwrap();
    let edit = one(&docs, "ClusterRole", "t-charlm-operator-edit");
    let labels = &edit["metadata"]["labels"];
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    assert_eq!(
        labels["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert!(labels
        .get("rbac.authorization.k8s.io/aggregate-to-view")
        .is_none());
    let verbs = &edit["rules"][0]["verbs"];
    for v in [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ] {
        assert!(
            verbs.as_array().unwrap().iter().any(|x| x == v),
            "edit lacks {v}"
        );
    }
    assert_eq!(
        edit["rules"][1]["resources"],
        json!(["charlmtrainings/status"])
    );
    assert_eq!(
        edit["rules"][1]["verbs"],
        json!(["get"]),
        "the status is the operator's"
    );

    let view = one(&docs, "ClusterRole", "t-charlm-operator-view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert_eq!(view["rules"][0]["verbs"], json!(["get", "list", "watch"]));

    let off = render(&["--set", "rbac.aggregateToDefaultRoles=false"]).unwrap();
    assert!(find(&off, "ClusterRole", "t-charlm-operator-edit").is_none());
    assert!(find(&off, "ClusterRole", "t-charlm-operator-view").is_none());
    one(&off, "ClusterRole", "t-charlm-operator");
}

#[test]
fn the_crd_is_rendered_from_templates_so_that_helm_upgrade_upgrades_it() {
    assert!(
        !chart().join("crds").exists(),
        "charts/charlm-operator/crds/ would be installed once and never upgraded by Helm"
    );
    let generated: Value = serde_json::to_value(charlm_api::crd()).expect("the CRD serialises");
    let docs = render(&[]).unwrap();
    let crd = one(
        &docs,
        "CustomResourceDefinition",
        "charlmtrainings.charlm.dev",
    );
    assert_eq!(
        crd["spec"], generated["spec"],
        "the chart's CRD is not the one `charlm-operator crd` prints"
    );
    assert_eq!(
        generated["metadata"],
        json!({"name": "charlmtrainings.charlm.dev"}),
        "templates/crd.yaml copies only the spec: carry new metadata over there"
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        crd["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );

    let unkept = render(&["--set", "crds.keep=false"]).unwrap();
    let crd = one(
        &unkept,
        "CustomResourceDefinition",
        "charlmtrainings.charlm.dev",
    );
    assert!(crd["metadata"].get("annotations").is_none());
    let none = render(&["--set", "crds.install=false"]).unwrap();
    assert!(find(
        &none,
        "CustomResourceDefinition",
        "charlmtrainings.charlm.dev"
    )
    .is_none());
}
