//! The labels Weft reads from Kubernetes objects, and what they decide:
//! whether a pod is enrolled, whether a pod is a waypoint, and which waypoint a
//! service or a namespace uses. Istio's ambient labels are read beside Weft's so
//! that a cluster can move over without relabelling.

use std::collections::BTreeMap;

use crate::model::UseWaypoint;

/// `enabled` on a namespace or a pod meshes it; `disabled` on a pod opts it out.
pub const MESH: &str = "weft.dev/mesh";
/// Istio ambient's enrollment label: `ambient` meshes, `none` opts out.
pub const ISTIO_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// `waypoint` on a pod: it speaks HBONE itself (`native_tunnel`), never captured.
pub const ROLE: &str = "weft.dev/role";
/// The waypoint (a service's name) a service, or every service of a namespace,
/// goes through; `none` opts out.
pub const USE_WAYPOINT: &str = "weft.dev/use-waypoint";
pub const ISTIO_USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The namespace of that waypoint when it is not the object's own.
pub const USE_WAYPOINT_NAMESPACE: &str = "weft.dev/use-waypoint-namespace";
pub const ISTIO_USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";

/// What an object's labels say about meshing it: `Some(true)` on, `Some(false)`
/// off, `None` nothing (a pod then follows its namespace). Off wins over on when
/// both are written, so an opt-out is never overridden by a second label.
pub fn mesh_mode(labels: &BTreeMap<String, String>) -> Option<bool> {
    let weft = labels.get(MESH).map(String::as_str);
    let istio = labels.get(ISTIO_DATAPLANE_MODE).map(String::as_str);
    if weft == Some("disabled") || istio == Some("none") {
        Some(false)
    } else if weft == Some("enabled") || istio == Some("ambient") {
        Some(true)
    } else {
        None
    }
}

/// Whether a pod is enrolled: its own label first, then its namespace's. A
/// waypoint is never enrolled (it is reached over HBONE, not captured).
pub fn enrolled(pod: Option<bool>, namespace: Option<bool>, native_tunnel: bool) -> bool {
    !native_tunnel && pod.or(namespace).unwrap_or(false)
}

/// Whether a pod is a waypoint.
pub fn is_waypoint(labels: &BTreeMap<String, String>) -> bool {
    labels.get(ROLE).map(String::as_str) == Some("waypoint")
}

/// The waypoint binding an object's labels write, Weft's label over Istio's.
/// A label value cannot hold `/`, so another namespace is a second label.
pub fn use_waypoint(labels: &BTreeMap<String, String>, own_namespace: &str) -> Option<UseWaypoint> {
    let (name, ns) = match labels.get(USE_WAYPOINT) {
        Some(name) => (name, labels.get(USE_WAYPOINT_NAMESPACE)),
        None => (
            labels.get(ISTIO_USE_WAYPOINT)?,
            labels.get(ISTIO_USE_WAYPOINT_NAMESPACE),
        ),
    };
    if name == "none" {
        return Some(UseWaypoint::None);
    }
    Some(UseWaypoint::Service {
        namespace: ns.map_or(own_namespace, String::as_str).to_owned(),
        name: name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn enrollment_follows_the_pod_then_its_namespace_and_off_wins() {
        let on = labels(&[(MESH, "enabled")]);
        let ambient = labels(&[(ISTIO_DATAPLANE_MODE, "ambient")]);
        let off = labels(&[(MESH, "disabled")]);
        let none = labels(&[(ISTIO_DATAPLANE_MODE, "none")]);
        let both = labels(&[(MESH, "enabled"), (ISTIO_DATAPLANE_MODE, "none")]);
        assert_eq!(mesh_mode(&on), Some(true));
        assert_eq!(mesh_mode(&ambient), Some(true));
        assert_eq!(mesh_mode(&off), Some(false));
        assert_eq!(mesh_mode(&none), Some(false));
        assert_eq!(mesh_mode(&both), Some(false));
        assert_eq!(mesh_mode(&labels(&[(MESH, "yes")])), None);
        assert!(enrolled(None, Some(true), false));
        assert!(!enrolled(Some(false), Some(true), false));
        assert!(enrolled(Some(true), None, false));
        assert!(!enrolled(None, None, false));
        assert!(!enrolled(Some(true), Some(true), true), "a waypoint");
    }

    #[test]
    fn waypoint_labels_bind_by_name_and_namespace() {
        assert_eq!(use_waypoint(&labels(&[]), "shop"), None);
        assert_eq!(
            use_waypoint(&labels(&[(ISTIO_USE_WAYPOINT, "none")]), "shop"),
            Some(UseWaypoint::None)
        );
        assert_eq!(
            use_waypoint(
                &labels(&[
                    (USE_WAYPOINT, "wp"),
                    (ISTIO_USE_WAYPOINT, "other"),
                    (USE_WAYPOINT_NAMESPACE, "infra")
                ]),
                "shop"
            ),
            Some(UseWaypoint::Service {
                namespace: "infra".into(),
                name: "wp".into()
            })
        );
        assert_eq!(
            use_waypoint(&labels(&[(ISTIO_USE_WAYPOINT, "wp")]), "shop"),
            Some(UseWaypoint::Service {
                namespace: "shop".into(),
                name: "wp".into()
            })
        );
    }
}
