//! A validator for the structural OpenAPI schemas of CustomResourceDefinitions,
//! so the tests can check objects against the `weft.dev` CRDs without an API
//! server.
//!
//! It does what the API server does to a custom object before storing it, for
//! the keywords our schemas use: `type`, `properties` (an unknown field is an
//! error, where the API server would prune it and `kubectl apply
//! --validate=strict` would refuse it), `additionalProperties`, `required`,
//! `items`, `enum`, `nullable`, the length, item and property counts, and
//! `x-kubernetes-preserve-unknown-fields`. A schema that uses any other keyword
//! (`pattern`, `oneOf`, CEL rules, ...) is reported as an error rather than
//! silently passed, so a schema cannot grow a rule these tests would not check.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use serde_json::Value;

/// Checks `object` (a whole custom object: apiVersion, kind, metadata, spec)
/// against the schema of its version in `crd`. Returns every problem found,
/// each as `<path>: <what>`; empty means valid.
pub fn validate_object(crd: &CustomResourceDefinition, object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let Some((group, version)) = api_version.split_once('/') else {
        return vec![format!("apiVersion {api_version:?} has no group")];
    };
    if group != crd.spec.group || kind != crd.spec.names.kind {
        return vec![format!(
            "{api_version} {kind} is not {}/{}",
            crd.spec.group, crd.spec.names.kind
        )];
    }
    let Some(served) = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == version && v.served)
    else {
        return vec![format!("version {version} is not served")];
    };
    let Some(schema) = served
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
    else {
        return vec![format!("version {version} has no schema")];
    };
    let Some(fields) = object.as_object() else {
        return vec!["the object is not a mapping".into()];
    };
    // The API server checks apiVersion, kind and metadata itself; the schema
    // covers the rest of the root.
    let rest: serde_json::Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    validate(schema, &Value::Object(rest), "", &mut errors);
    errors
}

/// Checks `value` against `schema`, appending problems to `errors`.
pub fn validate(schema: &JSONSchemaProps, value: &Value, path: &str, errors: &mut Vec<String>) {
    let here = if path.is_empty() { "." } else { path };
    for keyword in unsupported(schema) {
        errors.push(format!(
            "{here}: the schema uses `{keyword}`, which this validator does not check"
        ));
    }
    if value.is_null() {
        if schema.nullable != Some(true) {
            errors.push(format!("{here}: null is not allowed"));
        }
        return;
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let allowed: Vec<String> = allowed.iter().map(|a| a.0.to_string()).collect();
        errors.push(format!(
            "{here}: {value} is not one of [{}]",
            allowed.join(", ")
        ));
    }
    if schema.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{here}: expected an integer or a string"));
        }
        return;
    }
    let preserve = schema.x_kubernetes_preserve_unknown_fields == Some(true);
    match schema.type_.as_deref() {
        Some("object") => {
            let Some(map) = value.as_object() else {
                errors.push(format!(
                    "{here}: expected an object, got {}",
                    kind_of(value)
                ));
                return;
            };
            counts(
                here,
                map.len(),
                schema.min_properties,
                schema.max_properties,
                "properties",
                errors,
            );
            for key in schema.required.iter().flatten() {
                if !map.contains_key(key) {
                    errors.push(format!("{here}: required field `{key}` is missing"));
                }
            }
            let empty = BTreeMap::new();
            let properties = schema.properties.as_ref().unwrap_or(&empty);
            for (key, item) in map {
                let child = format!("{path}.{key}");
                if let Some(sub) = properties.get(key) {
                    validate(sub, item, &child, errors);
                    continue;
                }
                match &schema.additional_properties {
                    Some(JSONSchemaPropsOrBool::Schema(sub)) => validate(sub, item, &child, errors),
                    Some(JSONSchemaPropsOrBool::Bool(true)) => {}
                    _ if preserve => {}
                    _ => errors.push(format!("{child}: unknown field `{key}`")),
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                errors.push(format!("{here}: expected an array, got {}", kind_of(value)));
                return;
            };
            counts(
                here,
                items.len(),
                schema.min_items,
                schema.max_items,
                "items",
                errors,
            );
            match &schema.items {
                Some(JSONSchemaPropsOrArray::Schema(sub)) => {
                    for (i, item) in items.iter().enumerate() {
                        validate(sub, item, &format!("{path}[{i}]"), errors);
                    }
                }
                Some(JSONSchemaPropsOrArray::Schemas(_)) => {
                    errors.push(format!("{here}: tuple `items` are not structural"))
                }
                None if preserve => {}
                None => errors.push(format!("{here}: an array schema without `items`")),
            }
        }
        Some("string") => match value.as_str() {
            Some(s) => counts(
                here,
                s.chars().count(),
                schema.min_length,
                schema.max_length,
                "characters",
                errors,
            ),
            None => errors.push(format!("{here}: expected a string, got {}", kind_of(value))),
        },
        Some("integer") => {
            if !(value.is_i64() || value.is_u64()) {
                errors.push(format!(
                    "{here}: expected an integer, got {}",
                    kind_of(value)
                ));
            }
        }
        Some("number") => {
            if !value.is_number() {
                errors.push(format!("{here}: expected a number, got {}", kind_of(value)));
            }
        }
        Some("boolean") => {
            if !value.is_boolean() {
                errors.push(format!(
                    "{here}: expected a boolean, got {}",
                    kind_of(value)
                ));
            }
        }
        Some(other) => errors.push(format!("{here}: unknown schema type `{other}`")),
        None if preserve => {}
        None => errors.push(format!("{here}: the schema has no `type` (not structural)")),
    }
}

/// The rules a structural schema must follow (apiextensions.k8s.io/v1), as far
/// as our CRDs go: every node has a `type`, `properties` and
/// `additionalProperties` are not mixed, and nothing below `spec` keeps
/// unknown fields. Returns every violation with its path.
pub fn structural_problems(schema: &JSONSchemaProps, path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let here = if path.is_empty() { "." } else { path };
    if schema.type_.is_none() && schema.x_kubernetes_int_or_string != Some(true) {
        problems.push(format!("{here}: no type"));
    }
    if schema.properties.is_some() && schema.additional_properties.is_some() {
        problems.push(format!("{here}: both properties and additionalProperties"));
    }
    if schema.x_kubernetes_preserve_unknown_fields == Some(true) && path.starts_with(".spec") {
        problems.push(format!("{here}: keeps unknown fields"));
    }
    for (key, sub) in schema.properties.iter().flatten() {
        problems.extend(structural_problems(sub, &format!("{path}.{key}")));
    }
    if let Some(JSONSchemaPropsOrBool::Schema(sub)) = &schema.additional_properties {
        problems.extend(structural_problems(sub, &format!("{path}.*")));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(sub)) = &schema.items {
        problems.extend(structural_problems(sub, &format!("{path}[]")));
    }
    problems
}

/// Keywords set on `schema` that [`validate`] does not check.
fn unsupported(schema: &JSONSchemaProps) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut check = |set: bool, name: &'static str| {
        if set {
            found.push(name);
        }
    };
    check(schema.pattern.is_some(), "pattern");
    check(schema.pattern_properties.is_some(), "patternProperties");
    check(schema.format.is_some(), "format");
    check(schema.all_of.is_some(), "allOf");
    check(schema.any_of.is_some(), "anyOf");
    check(schema.one_of.is_some(), "oneOf");
    check(schema.not.is_some(), "not");
    check(schema.minimum.is_some(), "minimum");
    check(schema.maximum.is_some(), "maximum");
    check(schema.multiple_of.is_some(), "multipleOf");
    check(schema.unique_items.is_some(), "uniqueItems");
    check(schema.default.is_some(), "default");
    check(
        schema.x_kubernetes_validations.is_some(),
        "x-kubernetes-validations",
    );
    check(
        schema.x_kubernetes_list_type.is_some(),
        "x-kubernetes-list-type",
    );
    check(
        schema.x_kubernetes_map_type.is_some(),
        "x-kubernetes-map-type",
    );
    check(
        schema.x_kubernetes_embedded_resource.is_some(),
        "x-kubernetes-embedded-resource",
    );
    found
}

fn counts(
    here: &str,
    n: usize,
    min: Option<i64>,
    max: Option<i64>,
    what: &str,
    errors: &mut Vec<String>,
) {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if let Some(min) = min
        && n < min
    {
        errors.push(format!("{here}: {n} {what}, fewer than {min}"));
    }
    if let Some(max) = max
        && n > max
    {
        errors.push(format!("{here}: {n} {what}, more than {max}"));
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(json: Value) -> JSONSchemaProps {
        serde_json::from_value(json).unwrap()
    }

    fn errors(schema: &JSONSchemaProps, value: Value) -> Vec<String> {
        let mut errors = Vec::new();
        validate(schema, &value, "", &mut errors);
        errors
    }

    #[test]
    fn each_keyword_rejects_what_it_forbids() {
        let s = schema(serde_json::json!({
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 3},
                "mode": {"type": "string", "enum": ["A", "B"]},
                "n": {"type": "integer"},
                "on": {"type": "boolean"},
                "tags": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            },
        }));
        let ok = serde_json::json!({
            "name": "abc", "mode": "B", "n": 3, "on": true, "tags": ["x"],
            "labels": {"a": "b"}, "free": {"anything": [1, {"x": null}]},
        });
        assert_eq!(errors(&s, ok), Vec::<String>::new());
        let table = [
            (serde_json::json!({}), ".: required field `name` is missing"),
            (
                serde_json::json!({"name": ""}),
                ".name: 0 characters, fewer than 1",
            ),
            (
                serde_json::json!({"name": "abcd"}),
                ".name: 4 characters, more than 3",
            ),
            (
                serde_json::json!({"name": "a", "mode": "C"}),
                ".mode: \"C\" is not one of [\"A\", \"B\"]",
            ),
            (
                serde_json::json!({"name": "a", "n": "3"}),
                ".n: expected an integer, got a string",
            ),
            (
                serde_json::json!({"name": "a", "n": 1.5}),
                ".n: expected an integer, got a number",
            ),
            (
                serde_json::json!({"name": "a", "on": "yes"}),
                ".on: expected a boolean, got a string",
            ),
            (
                serde_json::json!({"name": "a", "tags": ["x", "y"]}),
                ".tags: 2 items, more than 1",
            ),
            (
                serde_json::json!({"name": "a", "tags": [1]}),
                ".tags[0]: expected a string, got a number",
            ),
            (
                serde_json::json!({"name": "a", "labels": {"a": 1}}),
                ".labels.a: expected a string, got a number",
            ),
            (
                serde_json::json!({"name": "a", "nmae": "b"}),
                ".nmae: unknown field `nmae`",
            ),
            (
                serde_json::json!({"name": null}),
                ".name: null is not allowed",
            ),
        ];
        for (value, expected) in table {
            assert_eq!(
                errors(&s, value.clone()),
                vec![expected.to_owned()],
                "{value}"
            );
        }
    }

    #[test]
    fn a_keyword_it_cannot_check_is_an_error_not_a_pass() {
        let s = schema(serde_json::json!({"type": "string", "pattern": "^a$"}));
        assert_eq!(
            errors(&s, serde_json::json!("b")),
            vec![".: the schema uses `pattern`, which this validator does not check"]
        );
    }

    #[test]
    fn structural_rules() {
        let s = schema(serde_json::json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "untyped": {},
                    "loose": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                }},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            },
        }));
        assert_eq!(
            structural_problems(&s, ""),
            vec![
                ".spec.loose: keeps unknown fields",
                ".spec.untyped: no type"
            ]
        );
    }
}
