//! A pod's volumes as directories on this machine:
//! - `persistentVolumeClaim`: the bound PersistentVolume's `hostPath`/`local` path (the e2e control
//!   plane's default class provisions hostPath volumes), else a per-claim directory under the
//!   runner's state; either way it outlives the pod, like a real claim.
//! - `emptyDir`: a per-pod directory (medium Memory: under /dev/shm), gone with the pod.
//! - `configMap`, `secret`, `downwardAPI`, `projected` (ServiceAccount token through TokenRequest,
//!   bound to the pod; `kube-root-ca.crt`; namespace): files written once at pod start, read-only.
//! - `hostPath`: the path itself.
//!
//! Anything that is not there yet (an unbound claim, a missing ConfigMap) is [`NotReady::Wait`]:
//! the worker retries, as the kubelet keeps a pod in ContainerCreating.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::launch::{field, PodInputs};

#[derive(Debug)]
pub enum NotReady {
    /// Not yet possible; try again later (the message says what is missing).
    Wait(String),
    /// Never possible; the pod fails with this message.
    Fatal(String),
}

/// Where the pod's volumes live on this machine.
pub struct VolumeDirs {
    /// The pod's own directory (emptyDir and file volumes under `volumes/`).
    pub pod_dir: PathBuf,
    /// The pod's directory for memory-backed emptyDirs, if this machine has /dev/shm.
    pub memory_dir: Option<PathBuf>,
    /// Where claims without a host path keep their data: `<claims_dir>/<namespace>/<claim>-<uid>`.
    pub claims_dir: PathBuf,
}

/// Resolves every volume of the pod into `inputs.volumes` / `inputs.read_only_volumes`.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    dirs: &VolumeDirs,
    inputs: &mut PodInputs,
) -> Result<(), NotReady> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let (path, read_only) = prepare_one(client, pod, &ns, volume, dirs, inputs).await?;
        inputs.volumes.insert(volume.name.clone(), path);
        if read_only {
            inputs.read_only_volumes.insert(volume.name.clone());
        }
    }
    Ok(())
}

async fn prepare_one(
    client: &Client,
    pod: &Pod,
    ns: &str,
    v: &Volume,
    dirs: &VolumeDirs,
    inputs: &PodInputs,
) -> Result<(PathBuf, bool), NotReady> {
    let own_dir = dirs.pod_dir.join("volumes").join(&v.name);
    if let Some(e) = &v.empty_dir {
        let dir = match (&dirs.memory_dir, e.medium.as_deref()) {
            (Some(mem), Some("Memory")) => mem.join(&v.name),
            _ => own_dir,
        };
        mkdir(&dir)?;
        return Ok((dir, false));
    }
    if let Some(c) = &v.persistent_volume_claim {
        let dir = claim_dir(client, ns, &c.claim_name, &dirs.claims_dir).await?;
        return Ok((dir, c.read_only.unwrap_or(false)));
    }
    if let Some(h) = &v.host_path {
        let path = PathBuf::from(&h.path);
        match h.type_.as_deref().unwrap_or("") {
            "FileOrCreate" if !path.exists() => {
                if let Some(parent) = path.parent() {
                    mkdir(parent)?;
                }
                std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            }
            "" | "DirectoryOrCreate" if !path.exists() => mkdir(&path)?,
            _ if !path.exists() => {
                return Err(NotReady::Wait(format!(
                    "hostPath {} does not exist",
                    h.path
                )))
            }
            _ => {}
        }
        return Ok((path, false));
    }
    // The rest are files this runner writes: start from an empty directory each time.
    let mut files: Vec<(String, Vec<u8>, i32)> = Vec::new();
    if let Some(c) = &v.config_map {
        let mode = c.default_mode.unwrap_or(0o644);
        if let Some(cm) = get_config_map(client, ns, &c.name, c.optional).await? {
            files.extend(config_map_files(&cm, &c.items, c.optional, mode)?);
        }
    } else if let Some(s) = &v.secret {
        let mode = s.default_mode.unwrap_or(0o644);
        let name = s.secret_name.clone().unwrap_or_default();
        if let Some(secret) = get_secret(client, ns, &name, s.optional).await? {
            files.extend(secret_files(&secret, &s.items, s.optional, mode)?);
        }
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(0o644);
        for item in d.items.iter().flatten() {
            files.push(downward_file(pod, inputs, item, mode)?);
        }
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644);
        for source in p.sources.iter().flatten() {
            if let Some(t) = &source.service_account_token {
                let token = service_account_token(client, pod, ns, t).await?;
                files.push((t.path.clone(), token.into_bytes(), mode));
            } else if let Some(c) = &source.config_map {
                if let Some(cm) = get_config_map(client, ns, &c.name, c.optional).await? {
                    files.extend(config_map_files(&cm, &c.items, c.optional, mode)?);
                }
            } else if let Some(s) = &source.secret {
                if let Some(secret) = get_secret(client, ns, &s.name, s.optional).await? {
                    files.extend(secret_files(&secret, &s.items, s.optional, mode)?);
                }
            } else if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    files.push(downward_file(pod, inputs, item, mode)?);
                }
            } else {
                return Err(NotReady::Fatal(format!(
                    "volume {}: a projected source this stand-in kubelet does not support",
                    v.name
                )));
            }
        }
    } else {
        return Err(NotReady::Fatal(format!(
            "volume {}: a volume type this stand-in kubelet does not support \
             (it has emptyDir, persistentVolumeClaim, hostPath, configMap, secret, downwardAPI, projected)",
            v.name
        )));
    }
    write_files(&own_dir, &files)?;
    Ok((own_dir, true))
}

async fn claim_dir(
    client: &Client,
    ns: &str,
    claim: &str,
    claims_dir: &Path,
) -> Result<PathBuf, NotReady> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc = pvcs
        .get_opt(claim)
        .await
        .map_err(|e| NotReady::Wait(format!("reading claim {claim}: {e}")))?
        .ok_or_else(|| NotReady::Wait(format!("persistentvolumeclaim {claim:?} not found")))?;
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let volume = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
    let Some(volume) = volume.filter(|_| bound) else {
        return Err(NotReady::Wait(format!(
            "persistentvolumeclaim {claim:?} is not bound yet"
        )));
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs
        .get_opt(&volume)
        .await
        .map_err(|e| NotReady::Wait(format!("reading volume {volume}: {e}")))?
        .ok_or_else(|| NotReady::Wait(format!("persistentvolume {volume:?} not found")))?;
    let spec = pv.spec.unwrap_or_default();
    let host = spec
        .host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path));
    let dir = match host {
        Some(path) => PathBuf::from(path),
        None => claims_dir
            .join(ns)
            .join(format!("{claim}-{}", pvc.metadata.uid.unwrap_or_default())),
    };
    mkdir(&dir)?;
    Ok(dir)
}

async fn get_config_map(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<Option<ConfigMap>, NotReady> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(cm)) => Ok(Some(cm)),
        Ok(None) if optional == Some(true) => Ok(None),
        Ok(None) => Err(NotReady::Wait(format!("configmap {name:?} not found"))),
        Err(e) => Err(NotReady::Wait(format!("reading configmap {name:?}: {e}"))),
    }
}

async fn get_secret(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<Option<Secret>, NotReady> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(s)) => Ok(Some(s)),
        Ok(None) if optional == Some(true) => Ok(None),
        Ok(None) => Err(NotReady::Wait(format!("secret {name:?} not found"))),
        Err(e) => Err(NotReady::Wait(format!("reading secret {name:?}: {e}"))),
    }
}

/// ConfigMaps and Secrets that the containers' env and envFrom name, for [`PodInputs`]; missing
/// ones are left out (whether that is an error depends on `optional`, decided at launch).
pub async fn env_sources(client: &Client, pod: &Pod, inputs: &mut PodInputs) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut cms = HashSet::new();
    let mut secrets = HashSet::new();
    let containers = pod.spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    });
    for c in containers {
        for from in c.env_from.iter().flatten() {
            cms.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
            secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
        }
        for var in c.env.iter().flatten() {
            if let Some(f) = &var.value_from {
                cms.extend(f.config_map_key_ref.as_ref().map(|r| r.name.clone()));
                secrets.extend(f.secret_key_ref.as_ref().map(|r| r.name.clone()));
            }
        }
    }
    for name in cms {
        if let Ok(Some(cm)) = get_config_map(client, &ns, &name, Some(true)).await {
            inputs.config_maps.insert(name, cm);
        }
    }
    for name in secrets {
        if let Ok(Some(s)) = get_secret(client, &ns, &name, Some(true)).await {
            inputs.secrets.insert(name, s);
        }
    }
}

type File = (String, Vec<u8>, i32);

fn keyed_files(
    what: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    optional: Option<bool>,
    mode: i32,
) -> Result<Vec<File>, NotReady> {
    match items {
        None => Ok(data.into_iter().map(|(k, v)| (k, v, mode)).collect()),
        Some(items) => {
            let mut files = Vec::new();
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        files.push((item.path.clone(), v.clone(), item.mode.unwrap_or(mode)))
                    }
                    None if optional == Some(true) => {}
                    None => {
                        return Err(NotReady::Wait(format!("{what} has no key {:?}", item.key)))
                    }
                }
            }
            Ok(files)
        }
    }
}

fn config_map_files(
    cm: &ConfigMap,
    items: &Option<Vec<KeyToPath>>,
    optional: Option<bool>,
    mode: i32,
) -> Result<Vec<File>, NotReady> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    let what = format!("configmap {:?}", cm.metadata.name.as_deref().unwrap_or(""));
    keyed_files(&what, data, items, optional, mode)
}

fn secret_files(
    s: &Secret,
    items: &Option<Vec<KeyToPath>>,
    optional: Option<bool>,
    mode: i32,
) -> Result<Vec<File>, NotReady> {
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    data.extend(
        s.string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    let what = format!("secret {:?}", s.metadata.name.as_deref().unwrap_or(""));
    keyed_files(&what, data, items, optional, mode)
}

fn downward_file(
    pod: &Pod,
    inputs: &PodInputs,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    mode: i32,
) -> Result<File, NotReady> {
    let Some(f) = &item.field_ref else {
        return Err(NotReady::Fatal(format!(
            "downwardAPI item {}: only fieldRef is supported by the stand-in kubelet",
            item.path
        )));
    };
    let value = field(pod, inputs, &f.field_path).map_err(NotReady::Fatal)?;
    Ok((
        item.path.clone(),
        value.into_bytes(),
        item.mode.unwrap_or(mode),
    ))
}

async fn service_account_token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    t: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> Result<String, NotReady> {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: t.audience.iter().cloned().collect(),
            expiration_seconds: Some(t.expiration_seconds.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let response = api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .map_err(|e| NotReady::Wait(format!("token for serviceaccount {sa:?}: {e}")))?;
    response
        .status
        .map(|s| s.token)
        .ok_or_else(|| NotReady::Wait(format!("token for serviceaccount {sa:?}: no status")))
}

fn write_files(dir: &Path, files: &[File]) -> Result<(), NotReady> {
    use std::os::unix::fs::PermissionsExt as _;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    mkdir(dir)?;
    for (rel, bytes, mode) in files {
        if Path::new(rel).is_absolute() || rel.split('/').any(|c| c == "..") {
            return Err(NotReady::Fatal(format!(
                "volume file path {rel:?} leaves the volume"
            )));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            mkdir(parent)?;
        }
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode as u32 & 0o777))
            .map_err(|e| io(&path, e))?;
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<(), NotReady> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))
}

fn io(path: &Path, e: std::io::Error) -> NotReady {
    NotReady::Fatal(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn items_select_and_rename_keys_and_missing_keys_wait_unless_optional() {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}
        }))
        .unwrap();
        let all = config_map_files(&cm, &None, None, 0o644).unwrap();
        assert_eq!(all.len(), 2);
        let items = Some(vec![KeyToPath {
            key: "b".into(),
            path: "dir/b.txt".into(),
            mode: Some(0o600),
        }]);
        let some = config_map_files(&cm, &items, None, 0o644).unwrap();
        assert_eq!(some, vec![("dir/b.txt".to_string(), b"2".to_vec(), 0o600)]);
        let missing = Some(vec![KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }]);
        assert!(matches!(
            config_map_files(&cm, &missing, None, 0o644),
            Err(NotReady::Wait(_))
        ));
        assert!(config_map_files(&cm, &missing, Some(true), 0o644)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn file_volumes_are_written_fresh_and_cannot_escape() {
        let dir = std::env::temp_dir().join(format!("standin-volumes-{}", std::process::id()));
        write_files(&dir, &[("x/y".into(), b"hi".to_vec(), 0o640)]).unwrap();
        assert_eq!(std::fs::read(dir.join("x/y")).unwrap(), b"hi");
        write_files(&dir, &[("z".into(), b"2".to_vec(), 0o644)]).unwrap();
        assert!(!dir.join("x/y").exists(), "stale files are removed");
        assert!(matches!(
            write_files(&dir, &[("../evil".into(), vec![], 0o644)]),
            Err(NotReady::Fatal(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
