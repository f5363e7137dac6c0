//! What `kubectl explain`, `kubectl get` and server-side apply see of the CRD: a description on
//! every field (a real one, not the generated text of a Rust or Kubernetes type), on every printer
//! column and at the top; keyed lists as map lists; categories.

use serde_json::Value;

fn crd() -> Value {
    serde_json::to_value(charlm_api::crd()).unwrap()
}

fn version(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]
}

/// Descriptions that come from a type, not from the field: kube-derive's placeholder for the
/// root, and k8s-openapi's `Time` (every timestamp would read alike).
const GENERATED: [&str; 3] = [
    "Auto-generated derived type",
    "Time is a wrapper around time.Time",
    "MicroTime is version of Time",
];

/// Every property below `node`, with its path.
fn properties<'a>(node: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    if let Some(props) = node["properties"].as_object() {
        for (name, child) in props {
            let p = format!("{path}.{name}");
            out.push((p.clone(), child));
            properties(child, p, out);
        }
    }
    if node["items"].is_object() {
        properties(&node["items"], format!("{path}[]"), out);
    }
    if node["additionalProperties"].is_object() {
        properties(&node["additionalProperties"], format!("{path}{{}}"), out);
    }
}

#[test]
fn every_field_has_a_description_of_its_own() {
    let crd = crd();
    let root = &version(&crd)["schema"]["openAPIV3Schema"];
    let mut fields = vec![(String::from("<root>"), root)];
    properties(root, String::new(), &mut fields);
    assert!(
        fields.len() > 150,
        "the walk found only {} fields",
        fields.len()
    );
    let bad: Vec<String> = fields
        .iter()
        // The API server refuses anything on metadata itself but its type; its name has one.
        .filter(|(path, _)| path != ".metadata")
        .filter_map(|(path, schema)| match schema["description"].as_str() {
            None => Some(format!("{path}: no description")),
            Some(d) if d.trim().is_empty() => Some(format!("{path}: an empty description")),
            Some(d) if GENERATED.iter().any(|g| d.starts_with(g)) => {
                Some(format!("{path}: the generated description {d:?}"))
            }
            Some(_) => None,
        })
        .collect();
    assert!(
        bad.is_empty(),
        "fields without a description of their own (add a /// doc comment to the field in \
         api/src):\n  {}",
        bad.join("\n  ")
    );
    let top = root["description"].as_str().unwrap();
    assert!(top.starts_with("A CharLMTraining trains"), "{top}");
}

#[test]
fn every_printer_column_has_a_description() {
    let crd = crd();
    let columns = version(&crd)["additionalPrinterColumns"]
        .as_array()
        .unwrap();
    assert_eq!(columns.len(), 14);
    for c in columns {
        let d = c["description"].as_str().unwrap_or_default();
        assert!(
            d.len() > 10,
            "printer column {} has no description",
            c["name"]
        );
    }
}

#[test]
fn keyed_lists_are_map_lists_whose_keys_are_required() {
    let crd = crd();
    let root = &version(&crd)["schema"]["openAPIV3Schema"];
    let status = &root["properties"]["status"]["properties"];
    let spec = &root["properties"]["spec"]["properties"];
    for (path, list, key) in [
        ("status.conditions", &status["conditions"], "type"),
        ("status.lossHistory", &status["lossHistory"], "step"),
        ("spec.env", &spec["env"], "name"),
    ] {
        assert_eq!(list["x-kubernetes-list-type"], "map", "{path}");
        assert_eq!(
            list["x-kubernetes-list-map-keys"],
            serde_json::json!([key]),
            "{path}"
        );
        // The API server refuses a map list whose key may be missing.
        let required = list["items"]["required"].as_array().unwrap();
        assert!(
            required.iter().any(|r| r == key),
            "{path}: key {key} is not required in {required:?}"
        );
    }
}

#[test]
fn trainings_are_listed_by_their_categories() {
    let crd = crd();
    let categories = &crd["spec"]["names"]["categories"];
    assert_eq!(categories, &serde_json::json!(["charlm", "training"]));
    assert!(
        !categories.as_array().unwrap().iter().any(|c| c == "all"),
        "`kubectl delete all --all` must not take trainings and their checkpoints"
    );
}
