//! CEL rules of the spec that are not a single field's bounds: fields fixed at creation, the
//! reserved environment, and the Kubernetes values (quantities, tolerations, env names) the API
//! server would otherwise reject only when the operator creates a pod or a claim, an hour later and
//! in the operator's log. Each rule names the field and the fix, so `kubectl apply` says it.

use kube::core::{Message, Reason, Rule};

use charlm_contract::env::RESERVED;

/// `field` of the spec cannot be set, unset or changed after creation.
pub fn fixed_at_creation(field: &str, why: &str) -> Rule {
    Rule::new(format!(
        "has(self.{field}) ? (has(oldSelf.{field}) && self.{field} == oldSelf.{field}) : !has(oldSelf.{field})"
    ))
    .message(Message::Message(format!(
        "{field} cannot change after creation: {why}; create a new training (another name) instead"
    )))
    .reason(Reason::FieldValueForbidden)
}

/// Why the model-defining fields are fixed.
pub const MODEL_FIXED: &str =
    "the checkpoints hold a model of the first shape, and a checkpoint cannot resume into another";

pub fn storage_class_fixed() -> Rule {
    fixed_at_creation(
        "storageClassName",
        "the checkpoint volume already exists with its class",
    )
    .message(
        "checkpoint.storageClassName cannot be set, unset or changed after creation: the checkpoint \
         volume already exists with its class; create a new training (another name) instead",
    )
}

pub fn env_names() -> Rule {
    Rule::new("self.all(e, size(e.name) > 0 && !e.name.contains('='))")
        .message("every spec.env entry needs a name, without '=' (e.g. name: MY_SETTING)")
        .reason(Reason::FieldValueRequired)
}

/// The operator's own variables: the gang's rendezvous (torchrun's names) and the settings the
/// status reports as effective. A user's value would silently break the gang or make the status lie.
pub fn env_not_reserved() -> Rule {
    let list: Vec<String> = RESERVED.iter().map(|n| format!("'{n}'")).collect();
    Rule::new(format!("self.all(e, !(e.name in [{}]))", list.join(", ")))
        .message(Message::Message(format!(
            "spec.env must not set {}: the operator sets them for the gang and from the spec's own \
             fields (depth, deviceBatchSize, hours, seqLen, checkpoint, ...), which are what to change",
            RESERVED.join(", ")
        )))
        .reason(Reason::FieldValueForbidden)
}

pub fn toleration_operators() -> Rule {
    Rule::new("self.all(t, !has(t.operator) || t.operator in ['Exists', 'Equal'])")
        .message("tolerations[].operator must be Exists or Equal (Equal when unset)")
}

pub fn toleration_effects() -> Rule {
    Rule::new(
        "self.all(t, !has(t.effect) || t.effect in ['', 'NoSchedule', 'PreferNoSchedule', 'NoExecute'])",
    )
    .message("tolerations[].effect must be NoSchedule, PreferNoSchedule or NoExecute (all when empty)")
}

pub fn toleration_exists_without_value() -> Rule {
    Rule::new(
        "self.all(t, !has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '')",
    )
    .message("a toleration with operator Exists matches any value: remove its value")
}

/// Every request and limit a quantity of at least 0 (`500m`, `2Gi`, `4`).
pub fn resource_quantities() -> Rule {
    let map_ok = |m: &str| {
        format!(
            "(!has(self.{m}) || self.{m}.all(k, isQuantity(string(self.{m}[k])) && !quantity(string(self.{m}[k])).isLessThan(quantity('0'))))"
        )
    };
    Rule::new(format!("{} && {}", map_ok("requests"), map_ok("limits"))).message(
        "resources.requests and resources.limits must be quantities of at least 0, such as 500m, 4 or 16Gi",
    )
}

/// `seqLen`'s bounds: the trainer's (`--seq-len`), from the contract, so the API server accepts
/// exactly what the trainer will.
pub fn seq_len() -> Rule {
    use charlm_contract::{MAX_SEQ_LEN, MIN_SEQ_LEN};
    Rule::new(format!("self >= {MIN_SEQ_LEN} && self <= {MAX_SEQ_LEN}")).message(Message::Message(
        format!(
        "seqLen must be between {MIN_SEQ_LEN} and {MAX_SEQ_LEN} tokens (the trainer's --seq-len)"
    ),
    ))
}

pub fn checkpoint_size() -> Rule {
    Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))")
        .message("checkpoint.size must be a positive quantity, such as 10Gi or 500Mi")
}

/// Two rules for one reason would leave the action to their order.
/// `reasons`: every reason's name (`crd::reason_names`), for the message.
pub fn failure_reasons_unique(reasons: &[&str]) -> Rule {
    Rule::new("self.all(r, self.exists_one(s, s.reason == r.reason))").message(Message::Message(
        format!(
            "restartPolicy.rules must name each reason at most once ({}): merge the rules of the \
             repeated reason into one",
            reasons.join(", ")
        ),
    ))
    // Not `FieldValueDuplicate`: the API server prints that as a bare "Duplicate value", without
    // the message.
}

/// `self in [...]` over `names`, as a CEL rule with its message. A schema `enum` says the same,
/// but the API server counts an unsupported value as an error that stops every CEL rule and adds
/// `<nil>: Invalid value: "null": some validation rules were not checked ...` to the message.
fn one_of(field: &str, names: &[&str]) -> serde_json::Value {
    let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    serde_json::json!({
        "rule": format!("self in [{}]", list.join(", ")),
        "message": format!("{field} must be one of {}", names.join(", ")),
    })
}

/// Linux refuses to start a process with an environment string (`NAME=value`) of 128 KiB or
/// more (`E2BIG`, "argument list too long"), or with an environment of about 2 MiB in all (a
/// quarter of the usual 8 MiB stack, shared with the operator's own variables and arguments).
/// The rules count characters, which CEL counts cheaply: a character is at most 4 bytes in UTF-8,
/// so these bounds keep every value under the first limit and all of them far under the second.
/// (Counting bytes costs more than the API server's budget for a list of 256 entries; and a rule
/// on the value itself would print the whole value back in its error.)
pub const ENV_VALUE_MAX_CHARS: usize = 32_000;
pub const ENV_TOTAL_MAX_CHARS: usize = 128_000;

pub fn env_value_size() -> Rule {
    Rule::new(format!(
        "self.all(e, !has(e.value) || size(e.value) <= {ENV_VALUE_MAX_CHARS})"
    ))
    .message(Message::Message(format!(
        "each spec.env value must be at most {ENV_VALUE_MAX_CHARS} characters: Linux refuses to \
         start the trainer with an environment string of 128 KiB or more (\"argument list too \
         long\"); pass larger content as a file of the dataset instead"
    )))
}

pub fn env_total_size() -> Rule {
    Rule::new(format!(
        "self.map(e, has(e.value) ? size(e.value) : 0).sum() <= {ENV_TOTAL_MAX_CHARS}"
    ))
    .message(Message::Message(format!(
        "the spec.env values must be at most {ENV_TOTAL_MAX_CHARS} characters in all: Linux \
         refuses to start the trainer with an environment of about 2 MiB (\"argument list too \
         long\"), shared with the operator's own variables; pass larger content as files of the \
         dataset instead"
    )))
}

/// A name the API server accepts for a ConfigMap or PersistentVolumeClaim (a DNS-1123
/// subdomain). Anything else would be read as another path: a `/` makes the operator's GET a
/// subresource request, refused with 403 on every reconcile.
pub fn object_name(field: &str, kind: &str, example: &str) -> Rule {
    Rule::new(format!("self.matches('{DNS_SUBDOMAIN}')")).message(Message::Message(format!(
        "{field} must be the name of a {kind} in the training's namespace: lower-case \
             letters, digits, '-' and '.', starting and ending with a letter or digit, at most \
             253 characters (such as {example})"
    )))
}

const DNS_SUBDOMAIN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

pub fn dataset_given() -> Rule {
    Rule::new("has(self.dataset)")
        .message(
            "spec.dataset is required: set one of dataset.pvc (a claim holding .txt files), \
             dataset.configMap or dataset.synthetic",
        )
        .reason(Reason::FieldValueRequired)
}

/// The name rule, on `metadata.name` itself so that the error names the field.
pub const NAME_RULE: &str = "size(self) <= 40 && self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
pub const NAME_MESSAGE: &str = "metadata.name must be at most 40 characters of lower-case letters, digits and '-', starting with a letter: it names the pods (<name>-worker-<i>) and the Service (<name>-workers), which must be DNS labels";

/// A dataset claim named like the training's checkpoint claim (`<name>-checkpoints`) would be
/// the volume the operator writes checkpoints to, and went with the training: refused at apply.
/// A rule of the whole object, since only there is `metadata.name` in reach; `fieldPath` and the
/// `Forbidden` reason make the error name the field, without a value.
pub fn dataset_not_checkpoint_claim() -> serde_json::Value {
    let claim = "self.spec.dataset.pvc.claimName";
    serde_json::json!({
        "rule": format!(
            "!has(self.metadata.name) || !has(self.spec) || !has(self.spec.dataset) || \
             !has(self.spec.dataset.pvc) || {claim} != self.metadata.name + '-checkpoints'"
        ),
        "messageExpression": format!(
            "'dataset.pvc.claimName ' + {claim} + ' is the name of the checkpoint claim the \
             operator makes for training ' + self.metadata.name + ' (<name>-checkpoints): its \
             checkpoints would go onto the dataset, and the claim with the training; give the \
             dataset claim or the training another name'"
        ),
        "message": "dataset.pvc.claimName must not be <metadata.name>-checkpoints, the name of \
                    the training's own checkpoint claim; give the dataset claim or the training \
                    another name",
        "reason": "FieldValueForbidden",
        "fieldPath": ".spec.dataset.pvc.claimName",
    })
}

/// What the derived schema cannot say, added to the CRD: the name rule on `metadata.name`, and
/// the bounds that keep the quantity rules' estimated cost within the API server's budget (it
/// refuses a rule over an unbounded map or string).
pub fn complete_schema(schema: &mut serde_json::Value, reasons: &[&str], actions: &[&str]) {
    schema["x-kubernetes-validations"] = serde_json::json!([dataset_not_checkpoint_claim()]);
    schema["properties"]["metadata"] = serde_json::json!({
        // The API server refuses anything on metadata itself but its type (a description too).
        "type": "object",
        "properties": {"name": {
            "type": "string",
            "description": "Names the worker pods (<name>-worker-<i>), the Service (<name>-workers) and the checkpoint claim (<name>-checkpoints): at most 40 lower-case letters, digits and '-', starting with a letter.",
            "maxLength": 253,
            "x-kubernetes-validations": [{"rule": NAME_RULE, "message": NAME_MESSAGE}]
        }}
    });
    let spec = &mut schema["properties"]["spec"];
    for map in ["requests", "limits"] {
        let m = &mut spec["properties"]["resources"]["properties"][map];
        m["maxProperties"] = 32.into();
        m["additionalProperties"]["maxLength"] = 64.into();
    }
    spec["properties"]["checkpoint"]["properties"]["size"]["maxLength"] = 64.into();
    let env = &mut spec["properties"]["env"];
    env["maxItems"] = 256.into();
    env["items"]["properties"]["name"]["maxLength"] = 256.into();
    let rule = &mut spec["properties"]["restartPolicy"]["properties"]["rules"]["items"];
    for (field, names) in [("reason", reasons), ("action", actions)] {
        let property = &mut rule["properties"][field];
        if let Some(p) = property.as_object_mut() {
            p.remove("enum");
        }
        property["maxLength"] = 64.into();
        property["x-kubernetes-validations"] =
            serde_json::json!([one_of(&format!("restartPolicy.rules[].{field}"), names)]);
    }
    let tolerations = &mut spec["properties"]["tolerations"];
    tolerations["maxItems"] = 64.into();
    for field in ["operator", "effect"] {
        tolerations["items"]["properties"][field]["maxLength"] = 32.into();
    }
    tolerations["items"]["properties"]["value"]["maxLength"] = 63.into(); // a label value
                                                                          // A missing dataset is explained by `dataset_given`, not by the schema's terse "Required
                                                                          // value" (which also suppresses every rule with "some validation rules were not checked").
    if let Some(props) = spec["properties"]["dataset"].as_object_mut() {
        props.remove("default");
    }
    if let Some(required) = spec["required"].as_array_mut() {
        required.retain(|r| r != "dataset");
    }
    if spec["required"].as_array().is_some_and(|r| r.is_empty()) {
        spec.as_object_mut().unwrap().remove("required");
    }
}
