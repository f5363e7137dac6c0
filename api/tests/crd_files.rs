//! The CRD files in the repository are generated from the `charlm-api` types (api/src); this fails when
//! someone changed the types and forgot to regenerate them.

use std::path::Path;

const REGENERATE: &str = "regenerate them with:\n  cargo run -p charlm-operator -- crd > crds/charlmtrainings.charlm.dev.yaml\n  cp crds/charlmtrainings.charlm.dev.yaml charts/charlm-operator/files/";

#[test]
fn crd_files_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let expected = charlm_api::crd_yaml();
    for file in [
        "crds/charlmtrainings.charlm.dev.yaml",
        // The chart renders it from templates/crd.yaml, so that `helm upgrade` upgrades it.
        "charts/charlm-operator/files/charlmtrainings.charlm.dev.yaml",
    ] {
        let path = root.join(file);
        let actual = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {file} ({e}); {REGENERATE}"));
        assert!(
            actual == expected,
            "{file} is stale: it differs from `charlm-operator crd`; {REGENERATE}"
        );
    }
}
