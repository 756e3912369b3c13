//! The images of a Kubernetes object: where its pod spec is for each
//! workload kind, and every container's image with the JSON pointer to it
//! (for the mutating webhook's patch).

use serde_json::Value;

/// Which list of the pod spec a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerList {
    Containers,
    InitContainers,
    EphemeralContainers,
}

impl ContainerList {
    pub const ALL: [ContainerList; 3] = [
        ContainerList::InitContainers,
        ContainerList::Containers,
        ContainerList::EphemeralContainers,
    ];

    /// The field name in the pod spec.
    pub fn field(self) -> &'static str {
        match self {
            ContainerList::Containers => "containers",
            ContainerList::InitContainers => "initContainers",
            ContainerList::EphemeralContainers => "ephemeralContainers",
        }
    }

    /// How a message names a container of this list.
    pub fn noun(self) -> &'static str {
        match self {
            ContainerList::Containers => "container",
            ContainerList::InitContainers => "init container",
            ContainerList::EphemeralContainers => "ephemeral container",
        }
    }
}

/// One container's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerImage {
    pub list: ContainerList,
    /// The container's name (empty if it has none).
    pub name: String,
    /// The image as written; `None` when missing or not a string.
    pub image: Option<String>,
    /// JSON pointer to the `image` field (`/spec/containers/0/image`).
    pub pointer: String,
}

/// The path of the pod spec inside an object of `kind` (core and `apps`/
/// `batch` kinds); `None` for kinds that run no pods.
pub fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &["spec"],
        "PodTemplate" => &["template", "spec"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    })
}

/// Whether `kind` of API group `group` runs pods (a workload whose images
/// are checked): the core, `apps` and `batch` kinds of
/// [`pod_spec_path`], not a custom resource that borrows a name.
pub fn is_workload(group: &str, kind: &str) -> bool {
    let expected = match kind {
        "Pod" | "ReplicationController" | "PodTemplate" => "",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => "apps",
        "Job" | "CronJob" => "batch",
        _ => return false,
    };
    group == expected
}

/// Why an object's containers cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0} is not a list")]
    NotAList(String),
    #[error("{0} is not an object")]
    NotAnObject(String),
}

/// Every container image of `object` (a `kind`), init containers first.
/// `Ok(None)` when the kind runs no pods; an object without a pod spec
/// (a Deployment scaled without a template, say) has no images.
pub fn containers(
    kind: &str,
    object: &Value,
) -> Result<Option<Vec<ContainerImage>>, WorkloadError> {
    let Some(path) = pod_spec_path(kind) else {
        return Ok(None);
    };
    let mut spec = object;
    let mut pointer = String::new();
    for key in path {
        pointer.push('/');
        pointer.push_str(key);
        match spec.get(key) {
            Some(v) if v.is_object() => spec = v,
            Some(Value::Null) | None => return Ok(Some(Vec::new())),
            Some(_) => return Err(WorkloadError::NotAnObject(pointer)),
        }
    }
    let mut out = Vec::new();
    for list in ContainerList::ALL {
        let at = format!("{pointer}/{}", list.field());
        let items = match spec.get(list.field()) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => items,
            Some(_) => return Err(WorkloadError::NotAList(at)),
        };
        for (i, c) in items.iter().enumerate() {
            if !c.is_object() {
                return Err(WorkloadError::NotAnObject(format!("{at}/{i}")));
            }
            out.push(ContainerImage {
                list,
                name: c
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                image: c.get("image").and_then(Value::as_str).map(str::to_string),
                pointer: format!("{at}/{i}/image"),
            });
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_workload_kind_has_its_pod_spec() {
        let pod = json!({"containers": [{"name": "a", "image": "x"}], "initContainers": [{"name": "i", "image": "y"}], "ephemeralContainers": [{"name": "e", "image": "z"}]});
        let cases = [
            ("Pod", json!({"spec": pod})),
            ("Deployment", json!({"spec": {"template": {"spec": pod}}})),
            (
                "CronJob",
                json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": pod}}}}}),
            ),
        ];
        for (kind, obj) in cases {
            let c = containers(kind, &obj).unwrap().unwrap();
            assert_eq!(c.len(), 3, "{kind}");
            assert_eq!(c[0].list, ContainerList::InitContainers);
            assert_eq!(c[0].image.as_deref(), Some("y"));
            let p = &c[1].pointer;
            assert_eq!(
                obj.pointer(p).and_then(Value::as_str),
                Some("x"),
                "{kind} {p}"
            );
        }
        assert_eq!(containers("ConfigMap", &json!({})).unwrap(), None);
        assert_eq!(
            containers("Deployment", &json!({"spec": {}})).unwrap(),
            Some(vec![])
        );
        assert!(containers("Pod", &json!({"spec": {"containers": 3}})).is_err());
        assert!(containers("Pod", &json!({"spec": []})).is_err());
        assert!(containers("Pod", &json!({"spec": {"containers": [1]}})).is_err());
    }
}
