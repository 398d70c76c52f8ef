//! `GET /api/openapi.json`: the API of `evaluator/API.md` as an OpenAPI 3 document.

use axum::Json;
use serde_json::{json, Value};

fn err(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok_json(desc: &str, schema: Value) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": schema}}})
}

pub fn spec() -> Value {
    let job_id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}});
    let auth = json!([{"bearer": []}]);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "BEAA evaluator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Encrypted image classification with RNS-CKKS. Ciphertexts and keys use the beaa-ckks byte format; every object carries the parameter fingerprint and is fully validated."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "the job token returned by POST /api/jobs"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "ParamSpec": {"type": "object", "required": ["log_n", "q_bits", "p_bits", "log_scale"], "properties": {
                    "log_n": {"type": "integer"}, "q_bits": {"type": "array", "items": {"type": "integer"}},
                    "p_bits": {"type": "array", "items": {"type": "integer"}}, "log_scale": {"type": "integer"}}},
                "ModelInfo": {"type": "object", "properties": {
                    "name": {"type": "string"}, "classes": {"type": "array", "items": {"type": "string"}},
                    "input": {"type": "object", "description": "the manifest's InputSpec"},
                    "params": {"$ref": "#/components/schemas/ParamSpec"},
                    "insecure_test_params": {"type": "boolean"}, "params_fingerprint": {"type": "string"},
                    "depth": {"type": "integer"}, "winograd": {"type": "array", "items": {"type": "string"}, "description": "layers computed in Winograd's form (beaa serve --winograd)"},
                    "input_ciphertexts": {"type": "integer"},
                    "output_ciphertexts": {"type": "integer"}, "max_batch": {"type": "integer"},
                    "input_ciphertext_bytes": {"type": "integer"}, "relin_key_bytes": {"type": "integer"},
                    "work_dir_bytes": {"type": "integer", "description": "the most bytes of intermediate ciphertexts a running job keeps on the server's disk"},
                    "logits_calibration_max_abs": {"type": ["number", "null"], "description": "the largest |logit| on the calibration images; clients flag images beyond 4x as unreliable"},
                    "validation": {"type": ["object", "null"], "description": "the model's validation result recorded at export (null if it has none): accuracy, balanced_accuracy and per_class_recall (fractions, per_class_recall in class order), images, split (LastPerClass: held-out images of each class; Group: every image of unseen patients)", "properties": {
                        "accuracy": {"type": "number"}, "balanced_accuracy": {"type": "number"}, "images": {"type": "integer"},
                        "per_class_recall": {"type": "array", "items": {"type": "number"}}, "split": {"type": ["string", "null"]}}}}},
                "JobStatus": {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "model": {"type": "string"}, "batch": {"type": "integer"},
                    "state": {"type": "string", "enum": ["uploading", "queued", "running", "done", "failed", "cancelled"]},
                    "inputs_present": {"type": "integer"}, "inputs_total": {"type": "integer"},
                    "progress": {"type": "number"}, "stage": {"type": "string", "nullable": true},
                    "eta_s": {"type": "number", "nullable": true}, "error": {"type": "string", "nullable": true},
                    "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"}}}
            }
        },
        "paths": {
            "/api/health": {"get": {"summary": "liveness", "responses": {"200": ok_json("ok", json!({"type": "object", "properties": {"ok": {"type": "boolean"}}}))}}},
            "/api/models": {"get": {"summary": "the served models (listed once planned)", "responses": {"200": ok_json("models", json!({"type": "object", "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/ModelInfo"}}, "loading": {"type": "array", "items": {"type": "string"}, "description": "models of the zoo still being planned"}}}))}}},
            "/api/keys": {"post": {
                "summary": "upload a relinearization key (content-addressed)",
                "parameters": [{"name": "model", "in": "query", "required": true, "schema": {"type": "string"}}],
                "requestBody": {"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "description": "exactly relin_key_bytes"},
                "responses": {
                    "201": ok_json("new key", json!({"type": "object", "properties": {"key_id": {"type": "string"}}})),
                    "200": ok_json("known key", json!({"type": "object", "properties": {"key_id": {"type": "string"}}})),
                    "400": err("wrong size, parameters or contents"), "404": err("unknown model"),
                    "413": err("too large"), "503": err("model still loading"), "507": err("disk quota")}}},
            "/api/jobs": {"post": {
                "summary": "create a job",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["model", "key_id", "batch"], "properties": {
                    "model": {"type": "string"}, "key_id": {"type": "string"}, "batch": {"type": "integer", "minimum": 1}}}}}},
                "responses": {
                    "201": ok_json("created", json!({"type": "object", "properties": {"job_id": {"type": "string"}, "token": {"type": "string"}, "inputs": {"type": "integer"}}})),
                    "400": err("bad request"), "404": err("unknown model or key"), "413": err("too large")}}},
            "/api/jobs/{id}": {
                "parameters": [job_id],
                "get": {"summary": "job status", "security": auth, "responses": {"200": ok_json("status", json!({"$ref": "#/components/schemas/JobStatus"})), "401": err("no token"), "404": err("unknown job or wrong token")}},
                "delete": {"summary": "delete (and cancel) a job", "security": auth, "responses": {"200": ok_json("deleted", json!({"type": "object", "properties": {"deleted": {"type": "boolean"}}})), "401": err("no token"), "404": err("unknown job or wrong token")}}},
            "/api/jobs/{id}/inputs": {
                "parameters": [job_id],
                "get": {"summary": "which inputs are present", "security": auth, "responses": {"200": ok_json("inputs", json!({"type": "object", "properties": {"total": {"type": "integer"}, "present": {"type": "integer"}, "missing": {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}}})), "404": err("unknown job or wrong token")}}},
            "/api/jobs/{id}/inputs/{k}": {
                "parameters": [job_id, {"name": "k", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0}}],
                "put": {"summary": "upload input ciphertext k (seeded, top level, default scale); idempotent", "security": auth,
                    "parameters": [{"name": "X-Checksum-Sha256", "in": "header", "required": false, "schema": {"type": "string"}}],
                    "requestBody": {"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}, "description": "exactly input_ciphertext_bytes"},
                    "responses": {"200": ok_json("stored", json!({"type": "object", "properties": {"k": {"type": "integer"}, "stored": {"type": "boolean"}}})),
                        "400": err("bad index, size, checksum, parameters or contents"), "404": err("unknown job or wrong token"),
                        "409": err("the job has started"), "413": err("too large"), "507": err("disk quota")}}},
            "/api/jobs/{id}/start": {
                "parameters": [job_id],
                "post": {"summary": "queue the job", "security": auth, "responses": {"202": ok_json("queued", json!({"type": "object", "properties": {"state": {"type": "string"}}})), "404": err("unknown job or wrong token"), "409": err("inputs missing (inputs_missing), another start in progress (job_starting) or job finished"), "507": err("the job's working space does not fit the disk quota")}}},
            "/api/jobs/{id}/result": {
                "parameters": [job_id],
                "get": {"summary": "the output ciphertexts: u32 LE count, then per logit a u64 LE length and the ciphertext bytes", "security": auth,
                    "responses": {"200": {"description": "result", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, "404": err("unknown job or wrong token"), "409": err("not done")}}}
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
