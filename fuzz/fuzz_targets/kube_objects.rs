//! Objects from the Kubernetes API, any of them malformed or hostile (a user
//! may create any Pod, Service, EndpointSlice, route or policy the API
//! accepts): each is translated and applied to a delta-sending state, every
//! update it sends is applied to an agent's view, and nothing panics; an
//! invalid object is left out, never the rest. Differential too: the mesh
//! kept by applying every update is, after each, the one a second state
//! (no deltas) assembles whole.
//!
//! Input: lines, each a kind byte (its low three bits: Namespace, Pod,
//! Service, EndpointSlice, HTTPRoute, AuthorizationPolicy,
//! PeerAuthentication, RequestAuthentication; its high bit: a delete) and the
//! object's JSON.
#![no_main]

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{core::DynamicObject, runtime::watcher::Event};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use weft::{
    discovery::kube::{
        Change, Group, Kinds, Res, State, Update,
        state::change,
        translate::{self, Entry},
    },
    model::{Mesh, Workload},
    view::{Balancers, View},
};

fn one<K: kube::Resource + DeserializeOwned>(
    state: &mut State,
    res: Res,
    json: &[u8],
    delete: bool,
    translate: fn(&K) -> Entry,
) {
    let Ok(object) = serde_json::from_slice::<K>(json) else {
        return;
    };
    let event = if delete {
        Event::Delete(object)
    } else {
        Event::Apply(object)
    };
    state.apply(res, change(event, translate));
}

fn synced(state: State) -> State {
    let mut state = state;
    for res in state.unsynced() {
        state.apply(res, Change::Absent);
    }
    state
}

fn sorted(mesh: &Mesh) -> Vec<Arc<Workload>> {
    let mut w = mesh.workloads.clone();
    w.sort_by_key(|w| w.key());
    w
}

fuzz_target!(|data: &[u8]| {
    let mut state = synced(State::new(Kinds::All, "cluster.local", "weft-system").with_deltas());
    let mut whole = synced(State::new(Kinds::All, "cluster.local", "weft-system"));
    let Some(Update::Mesh(first)) = state.next_update() else {
        panic!("a synced state sends a whole mesh first");
    };
    let mut kept = Mesh::clone(&first);
    let balancers = Balancers::default();
    let mut view = View::new((*first).clone(), "node-1", &balancers);
    for line in data.split(|b| *b == b'\n') {
        let Some((&kind, json)) = line.split_first() else {
            continue;
        };
        let delete = kind & 0x80 != 0;
        for s in [&mut state, &mut whole] {
            match kind & 7 {
                0 => one::<Namespace>(s, Res::Namespace, json, delete, translate::namespace),
                1 => one::<Pod>(s, Res::Pod, json, delete, translate::pod),
                2 => one::<Service>(s, Res::Service, json, delete, translate::service),
                3 => one::<EndpointSlice>(
                    s,
                    Res::EndpointSlice,
                    json,
                    delete,
                    translate::endpoint_slice,
                ),
                4 => one::<DynamicObject>(s, Res::HttpRoute, json, delete, translate::http_route),
                5 => one::<DynamicObject>(
                    s,
                    Res::AuthorizationPolicy(Group::Weft),
                    json,
                    delete,
                    translate::authorization_policy,
                ),
                6 => one::<DynamicObject>(
                    s,
                    Res::PeerAuthentication(Group::Weft),
                    json,
                    delete,
                    translate::peer_authentication,
                ),
                _ => one::<DynamicObject>(
                    s,
                    Res::RequestAuthentication(Group::Weft),
                    json,
                    delete,
                    translate::request_authentication,
                ),
            }
        }
        match state.next_update() {
            Some(Update::Mesh(mesh)) => {
                // What the state sends has passed validation.
                let problems = weft::model::validate::problems(&mesh);
                assert!(problems.is_empty(), "{problems:?}");
                kept = Mesh::clone(&mesh);
                view = View::new((*mesh).clone(), "node-1", &balancers);
            }
            Some(Update::Delta(delta)) => {
                kept.apply_delta(delta.clone());
                view = view.with_delta(delta, &balancers);
            }
            None => {}
        }
        let expected = whole.build().expect("synced");
        assert_eq!(sorted(&kept), sorted(&expected), "workloads");
        assert!(kept.eq_without_workloads(&expected), "the rest");
        assert_eq!(state.invalid(), whole.invalid(), "invalid objects");
        assert!(
            view.services().eq(expected.services.iter()),
            "the view's services"
        );
    }
    std::hint::black_box(view);
});
