//! Sources of the mesh model. Each translates what it reads into
//! [`crate::model::Mesh`], and the node-local facts it knows (a pod's network
//! namespace) into the node's registry. Today there is one: the local YAML file
//! (`file`), watched for changes (`watch`). Kubernetes discovery will be another.
//!
//! Whatever the source, [`guard`] decides whether a new mesh may replace the
//! one in force: a change that would take most of the mesh away at once is far
//! more often a truncated file or a broken generator than an intent.

pub mod file;
pub mod kube;
pub mod watch;

use crate::model::{Mesh, Workload};

/// Why a new mesh was refused by [`guard`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shrink {
    #[error(
        "every enrolled workload ({before}) is gone from it; nothing would be captured and pods would talk in plaintext"
    )]
    NothingEnrolled { before: usize },
    #[error(
        "{removed} of the {before} enrolled workloads are gone from it at once ({names}); a change that drops more than half of the mesh is refused"
    )]
    MostUnenrolled {
        removed: usize,
        before: usize,
        names: String,
    },
    #[error(
        "it would remove every authorization policy ({before} in force): connections they deny would be allowed"
    )]
    NoPolicies { before: usize },
}

/// Whether `next` may replace `current`. Refused, unless `allowed` (the source
/// says the change is meant: `allow_shrink: true` in the file):
/// - one from which every enrolled workload is gone;
/// - one from which more than half of the enrolled workloads are gone;
/// - one without authorization policies replacing one with some.
///
/// "Gone" is an entry that is no longer there, which is what a truncated file
/// or a source that lost its data looks like. A workload still listed but
/// marked not enrolled (`enrolled: false`), or placed on another node, is an
/// explicit change and always passes, as do small changes (a pod or two, one
/// policy): churn is normal.
pub fn guard(current: &Mesh, next: &Mesh, allowed: bool) -> Result<(), Shrink> {
    guard_workloads(
        current.workloads.iter().map(|w| &**w),
        current.authorization_policies.len(),
        next,
        allowed,
    )
}

/// [`guard`], with the mesh in force given as its workloads and its number of
/// authorization policies (a view holds them apart).
pub fn guard_workloads<'a>(
    current: impl IntoIterator<Item = &'a Workload>,
    policies: usize,
    next: &Mesh,
    allowed: bool,
) -> Result<(), Shrink> {
    if allowed {
        return Ok(());
    }
    // Indexed: a scan of `next` per workload is quadratic (100,000 pods:
    // minutes).
    let kept: std::collections::HashSet<(&str, &str)> = next
        .workloads
        .iter()
        .map(|w| (w.namespace.as_str(), w.name.as_str()))
        .collect();
    let mut before = 0;
    let removed: Vec<String> = current
        .into_iter()
        .filter(|w| w.enrolled)
        .inspect(|_| before += 1)
        .filter(|w| !kept.contains(&(w.namespace.as_str(), w.name.as_str())))
        .map(|w| w.key().to_string())
        .collect();
    if before > 0 && removed.len() == before {
        return Err(Shrink::NothingEnrolled { before });
    }
    if removed.len() * 2 > before {
        let mut names = removed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if removed.len() > 5 {
            names.push_str(&format!(" and {} more", removed.len() - 5));
        }
        return Err(Shrink::MostUnenrolled {
            removed: removed.len(),
            before,
            names,
        });
    }
    if policies > 0 && next.authorization_policies.is_empty() {
        return Err(Shrink::NoPolicies { before: policies });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, AuthorizationPolicy, Workload};

    fn mesh(enrolled: &[&str], others: &[&str], policies: usize) -> Mesh {
        let w = |name: &str, enrolled: bool| Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            node: "n0".into(),
            addresses: vec![],
            enrolled,
            outside_mesh: Default::default(),
            labels: Default::default(),
            native_tunnel: false,
        };
        Mesh {
            workloads: enrolled
                .iter()
                .map(|n| w(n, true))
                .chain(others.iter().map(|n| w(n, false)))
                .map(std::sync::Arc::new)
                .collect(),
            authorization_policies: (0..policies)
                .map(|i| AuthorizationPolicy {
                    name: format!("p{i}"),
                    namespace: "default".into(),
                    selector: None,
                    target_refs: vec![],
                    action: Action::Deny,
                    provider: None,
                    rules: vec![],
                })
                .collect(),
            ..Mesh::default()
        }
    }

    #[test]
    fn a_change_that_takes_most_of_the_mesh_away_is_refused_unless_allowed() {
        let now = mesh(&["a", "b", "c", "d"], &[], 2);
        // Churn passes: one pod goes, one comes, one policy goes.
        assert_eq!(
            guard(&now, &mesh(&["a", "b", "c", "e"], &[], 1), false),
            Ok(())
        );
        // Half may go at once; more may not.
        assert_eq!(guard(&now, &mesh(&["a", "b"], &[], 2), false), Ok(()));
        assert!(matches!(
            guard(&now, &mesh(&["a"], &[], 2), false),
            Err(Shrink::MostUnenrolled {
                removed: 3,
                before: 4,
                ..
            })
        ));
        // Marking them not enrolled is explicit: it passes, even for all.
        assert_eq!(
            guard(&now, &mesh(&["a"], &["b", "c", "d"], 2), false),
            Ok(())
        );
        assert_eq!(
            guard(&now, &mesh(&[], &["a", "b", "c", "d"], 2), false),
            Ok(())
        );
        assert_eq!(
            guard(&now, &mesh(&[], &[], 2), false),
            Err(Shrink::NothingEnrolled { before: 4 })
        );
        assert_eq!(
            guard(&now, &mesh(&["a", "b", "c", "d"], &[], 0), false),
            Err(Shrink::NoPolicies { before: 2 })
        );
        // Said on purpose.
        assert_eq!(guard(&now, &mesh(&[], &[], 0), true), Ok(()));
        // Growing from nothing is never a shrink.
        assert_eq!(guard(&Mesh::default(), &now, false), Ok(()));
    }
}
