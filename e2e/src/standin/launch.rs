//! Turns one container of a pod into a [`Launch`]: the program and its arguments, the environment
//! (with `valueFrom` and `$(VAR)` references resolved as the kubelet does), and the bind mounts.
//! Pure: everything read from the API server is resolved beforehand into [`PodInputs`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

use super::quantity;
use super::sandbox::{BindMount, Launch, DEFAULT_PATH, IMAGE_BIN_DIR};

/// What a pod's containers are started with, resolved from the API server and this runner.
#[derive(Debug, Default)]
pub struct PodInputs {
    pub pod_ip: String,
    pub host_ip: String,
    pub hostname: String,
    /// Volume name → host directory (or file) holding its contents.
    pub volumes: BTreeMap<String, PathBuf>,
    /// Volumes that are read-only whatever the mount says (configMap, secret, projected, ...).
    pub read_only_volumes: HashSet<String>,
    /// ConfigMaps and Secrets of the pod's namespace that env/envFrom name (absent ones missing).
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    /// The API server, injected as KUBERNETES_SERVICE_HOST/PORT (its real loopback address:
    /// there is no service network here).
    pub api_server: Option<(String, u16)>,
    /// The node's allocatable CPU (millicores) and memory (bytes): resourceFieldRef's value of an
    /// unset limit.
    pub node_cpu_millis: i64,
    pub node_memory_bytes: i64,
}

/// Per-container files the runner made: the sandbox root mount point, the termination message
/// file, and the pod's hosts file.
#[derive(Debug, Clone)]
pub struct ContainerFiles {
    pub root: PathBuf,
    pub termination_log: PathBuf,
    pub hosts: PathBuf,
}

/// The path kubelet uses when a container names none.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

pub fn launch(
    pod: &Pod,
    container: &Container,
    inputs: &PodInputs,
    files: &ContainerFiles,
    image_bin_dir: &Path,
) -> Result<Launch, String> {
    let env = environment(pod, container, inputs)?;
    let lookup: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let expand_all = |v: &Option<Vec<String>>| -> Vec<String> {
        v.iter().flatten().map(|s| expand(s, &lookup)).collect()
    };
    let command = expand_all(&container.command);
    let args = expand_all(&container.args);
    let (program, args) = match command.split_first() {
        Some((program, rest)) => (program.clone(), rest.iter().cloned().chain(args).collect()),
        None => {
            let image = container.image.as_deref().unwrap_or_default();
            let program = image_program(image).ok_or_else(|| {
                format!(
                    "container {} has no command and its image {image:?} names no program",
                    container.name
                )
            })?;
            (program, args)
        }
    };
    Ok(Launch {
        root: files.root.clone(),
        hostname: inputs.hostname.clone(),
        mounts: mounts(container, inputs, files)?,
        image_bin_dir: image_bin_dir.to_path_buf(),
        program,
        args,
        env,
        working_dir: container.working_dir.clone().unwrap_or_default(),
    })
}

/// The program an image stands for: its last path segment without tag or digest
/// (`registry:5000/charlm/charlm-trainer:e2e` → `charlm-trainer`).
pub fn image_program(image: &str) -> Option<String> {
    let without_digest = image.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    let name = last.split(':').next()?;
    (!name.is_empty()).then(|| name.to_string())
}

fn mounts(
    container: &Container,
    inputs: &PodInputs,
    files: &ContainerFiles,
) -> Result<Vec<BindMount>, String> {
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let volume = inputs.volumes.get(&m.name).ok_or_else(|| {
            format!(
                "container {} mounts volume {:?}, which the pod does not declare",
                container.name, m.name
            )
        })?;
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if sub.split('/').any(|c| c == "..") => {
                return Err(format!(
                    "subPath {sub:?} of volume {} leaves the volume",
                    m.name
                ))
            }
            Some(sub) => volume.join(sub),
            None => volume.clone(),
        };
        mounts.push(BindMount {
            source,
            target: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false) || inputs.read_only_volumes.contains(&m.name),
        });
    }
    let has = |target: &str| mounts.iter().any(|m: &BindMount| m.target == target);
    // As the kubelet does: a managed /etc/hosts naming the pod (unless the container mounts one).
    if !has("/etc/hosts") {
        mounts.push(BindMount {
            source: files.hosts.clone(),
            target: "/etc/hosts".to_string(),
            read_only: false,
        });
    }
    let message_path = container
        .termination_message_path
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.to_string());
    mounts.push(BindMount {
        source: files.termination_log.clone(),
        target: message_path,
        read_only: false,
    });
    // Parents before children: /work before /work/data.
    mounts.sort_by_key(|m| Path::new(&m.target).components().count());
    Ok(mounts)
}

/// The container's environment in the kubelet's order: the API server's service variables, then
/// envFrom, then env (later names win), each value's `$(VAR)` references expanded against what
/// came before; PATH led by the image's programs.
pub fn environment(
    pod: &Pod,
    container: &Container,
    inputs: &PodInputs,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    set(&mut env, "HOSTNAME".into(), inputs.hostname.clone());
    if let Some((host, port)) = &inputs.api_server {
        set(&mut env, "KUBERNETES_SERVICE_HOST".into(), host.clone());
        set(&mut env, "KUBERNETES_SERVICE_PORT".into(), port.to_string());
        set(
            &mut env,
            "KUBERNETES_SERVICE_PORT_HTTPS".into(),
            port.to_string(),
        );
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match inputs.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("configmap {:?} not found", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            match inputs.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), utf8(&v.0));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(format!("secret {:?} not found", r.name)),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => match value_from(pod, container, inputs, from)? {
                Some(v) => v,
                None => continue, // an optional reference that is missing: no variable
            },
            (Some(v), None) => {
                let lookup: BTreeMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(v, &lookup)
            }
            (None, None) => String::new(),
        };
        set(&mut env, var.name.clone(), value);
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    set(&mut env, "PATH".into(), format!("{IMAGE_BIN_DIR}:{path}"));
    if !env.iter().any(|(k, _)| k == "HOME") {
        set(&mut env, "HOME".into(), "/root".into());
    }
    Ok(env)
}

fn value_from(
    pod: &Pod,
    container: &Container,
    inputs: &PodInputs,
    from: &k8s_openapi::api::core::v1::EnvVarSource,
) -> Result<Option<String>, String> {
    if let Some(f) = &from.field_ref {
        return field(pod, inputs, &f.field_path).map(Some);
    }
    if let Some(r) = &from.resource_field_ref {
        return resource_field(pod, container, inputs, r).map(Some);
    }
    if let Some(r) = &from.config_map_key_ref {
        let value = inputs
            .config_maps
            .get(&r.name)
            .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned());
        return match value {
            Some(v) => Ok(Some(v)),
            None if r.optional == Some(true) => Ok(None),
            None => Err(format!("configmap {:?} has no key {:?}", r.name, r.key)),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let value = inputs
            .secrets
            .get(&r.name)
            .and_then(|s| s.data.as_ref()?.get(&r.key).map(|b| utf8(&b.0)));
        return match value {
            Some(v) => Ok(Some(v)),
            None if r.optional == Some(true) => Ok(None),
            None => Err(format!("secret {:?} has no key {:?}", r.name, r.key)),
        };
    }
    Err("an env valueFrom this stand-in kubelet does not support".to_string())
}

/// The downward API's fields (env `fieldRef` and downwardAPI volume items).
pub fn field(pod: &Pod, inputs: &PodInputs, path: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_suffix("']")?
            .trim_start_matches('\'');
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    let all = |map: &Option<BTreeMap<String, String>>| -> String {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect()
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => all(&meta.labels),
        "metadata.annotations" => all(&meta.annotations),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => inputs.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => inputs.host_ip.clone(),
        _ => keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations))
            .ok_or_else(|| format!("unsupported fieldRef {path:?}"))?,
    };
    Ok(value)
}

fn resource_field(
    pod: &Pod,
    container: &Container,
    inputs: &PodInputs,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
) -> Result<String, String> {
    let target = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => pod
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .find(|c| c.name == name)
            .ok_or_else(|| format!("resourceFieldRef names unknown container {name:?}"))?,
        None => container,
    };
    let (kind, resource) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resourceFieldRef {:?}", r.resource))?;
    let resources = target.resources.as_ref();
    let list = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("unsupported resourceFieldRef {:?}", r.resource)),
    };
    let set = list.and_then(|l| l.get(resource)).map(|q| q.0.as_str());
    let divisor = r.divisor.as_ref().map(|q| q.0.as_str()).unwrap_or("1");
    // As the kubelet: an unset limit is the node's allocatable, an unset request is zero
    // (for CPU, a request of zero reads as 1 after rounding up, as there).
    let (amount_milli, unit_milli) = match resource {
        "cpu" => (
            match set {
                Some(q) => quantity::milli(q)?,
                None if kind == "limits" => inputs.node_cpu_millis,
                None => 0,
            },
            quantity::milli(divisor)?,
        ),
        "memory" | "ephemeral-storage" => (
            match set {
                Some(q) => quantity::milli(q)?,
                None if kind == "limits" => inputs.node_memory_bytes.saturating_mul(1000),
                None => 0,
            },
            quantity::milli(divisor)?,
        ),
        _ => return Err(format!("unsupported resourceFieldRef {:?}", r.resource)),
    };
    if unit_milli <= 0 {
        return Err(format!(
            "resourceFieldRef divisor {divisor:?} is not positive"
        ));
    }
    let mut value = (amount_milli + unit_milli - 1) / unit_milli;
    if resource == "cpu" && value == 0 {
        value = 1;
    }
    Ok(value.to_string())
}

/// Kubernetes' `$(VAR)` expansion: a defined name is replaced, `$$` is a literal `$`, anything
/// else stays as written.
pub fn expand(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn utf8(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "w-0", "namespace": "ns", "uid": "u-1",
                         "labels": {"app": "charlm"}},
            "spec": {"nodeName": "cpu-0", "containers": containers}
        }))
        .unwrap()
    }

    fn inputs() -> PodInputs {
        PodInputs {
            pod_ip: "127.0.0.5".into(),
            host_ip: "127.0.0.1".into(),
            hostname: "w-0".into(),
            volumes: [("work".to_string(), PathBuf::from("/state/work"))].into(),
            api_server: Some(("127.0.0.1".into(), 6443)),
            node_cpu_millis: 8000,
            node_memory_bytes: 16 << 30,
            ..Default::default()
        }
    }

    fn files() -> ContainerFiles {
        ContainerFiles {
            root: "/state/root".into(),
            termination_log: "/state/msg".into(),
            hosts: "/state/hosts".into(),
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars: BTreeMap<&str, &str> = [("A", "1"), ("B", "x y")].into();
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x y");
        assert_eq!(expand("$$(A) $(C) $ $(", &vars), "$(A) $(C) $ $(");
        assert_eq!(expand("cost: $$5", &vars), "cost: $5");
    }

    #[test]
    fn image_names_map_to_programs() {
        assert_eq!(
            image_program("charlm-trainer:e2e").unwrap(),
            "charlm-trainer"
        );
        assert_eq!(
            image_program("registry:5000/org/charlm-operator@sha256:ab").unwrap(),
            "charlm-operator"
        );
        assert_eq!(image_program(""), None);
    }

    #[test]
    fn env_resolves_field_refs_and_references_and_leads_path_with_the_image() {
        let p = pod(json!([{
            "name": "main", "image": "charlm-trainer:e2e",
            "command": ["charlm-trainer"], "args": ["--at", "$(POD_IP):$(PORT)"],
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "PORT", "value": "29500"},
                {"name": "ADDR", "value": "$(POD_IP):$(PORT)"},
                {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
            ],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]
        }]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let l = launch(&p, c, &inputs(), &files(), Path::new("/bin-dir")).unwrap();
        let env: BTreeMap<_, _> = l.env.iter().cloned().collect();
        assert_eq!(env["POD_IP"], "127.0.0.5");
        assert_eq!(env["NAME"], "w-0");
        assert_eq!(env["APP"], "charlm");
        assert_eq!(env["ADDR"], "127.0.0.5:29500");
        assert_eq!(env["CPUS"], "8");
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
        assert_eq!(env["PATH"], format!("{IMAGE_BIN_DIR}:{DEFAULT_PATH}"));
        assert_eq!(l.program, "charlm-trainer");
        assert_eq!(l.args, ["--at", "127.0.0.5:29500"]);
        let targets: Vec<_> = l.mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/work", "/etc/hosts", "/dev/termination-log"]);
    }

    #[test]
    fn no_command_runs_the_image_program_with_args() {
        let p = pod(json!([{"name": "m", "image": "x/charlm-operator:1", "args": ["run"]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let l = launch(&p, c, &inputs(), &files(), Path::new("/b")).unwrap();
        assert_eq!(
            (l.program.as_str(), l.args.as_slice()),
            ("charlm-operator", &["run".to_string()][..])
        );
    }

    #[test]
    fn missing_references_are_errors_unless_optional() {
        let p = pod(json!([{"name": "m", "image": "i", "env": [
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}
        ]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let err = launch(&p, c, &inputs(), &files(), Path::new("/b")).unwrap_err();
        assert!(err.contains("configmap \"cm\""), "{err}");

        let p = pod(json!([{"name": "m", "image": "i", "env": [
            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k", "optional": true}}}
        ]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let l = launch(&p, c, &inputs(), &files(), Path::new("/b")).unwrap();
        assert!(!l.env.iter().any(|(k, _)| k == "X"));
    }

    #[test]
    fn unknown_volume_and_escaping_subpath_are_refused() {
        let p = pod(json!([{"name": "m", "image": "i",
            "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(launch(&p, c, &inputs(), &files(), Path::new("/b")).is_err());
        let p = pod(json!([{"name": "m", "image": "i",
            "volumeMounts": [{"name": "work", "mountPath": "/x", "subPath": "../etc"}]}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(launch(&p, c, &inputs(), &files(), Path::new("/b")).is_err());
    }
}
