// A small, local reader of /openapi.json (FastAPI's /docs loads Swagger UI from a CDN).
"use strict";

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function typeOf(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return typeOf(spec.components.schemas[schema.$ref.split("/").pop()], spec);
  if (schema.anyOf) return schema.anyOf.map((s) => typeOf(s, spec)).filter((t) => t !== "null").join(" | ");
  if (schema.type === "array") return `list of ${typeOf(schema.items, spec)}`;
  if (schema.format === "binary" || schema.contentMediaType === "application/octet-stream") return "file";
  return schema.type || "";
}

function fields(operation, spec) {
  const rows = [];
  for (const parameter of operation.parameters || []) {
    rows.push([parameter.name, parameter.in, typeOf(parameter.schema, spec), parameter.description || parameter.schema?.description || ""]);
  }
  const body = operation.requestBody?.content?.["multipart/form-data"]?.schema;
  const form = body?.$ref ? spec.components.schemas[body.$ref.split("/").pop()] : body;
  for (const [name, schema] of Object.entries(form?.properties || {})) {
    rows.push([name, "form", typeOf(schema, spec), schema.description || ""]);
  }
  if (!rows.length) return el("p", { class: "dim" }, "no parameters");
  return el("table", {}, el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))));
}

async function show() {
  const status = document.getElementById("docs-status");
  const token = sessionStorage.getItem("siglip-token");
  const response = await fetch("/openapi.json", { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (!response.ok) { status.textContent = `/openapi.json: ${response.status} (open the page first to give the token)`; return; }
  const spec = await response.json();
  const blocks = [];
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, operation] of Object.entries(methods)) {
      blocks.push(el("div", { class: "scores" }, el("h3", {}, `${method.toUpperCase()} ${path}`),
        el("p", {}, operation.summary || ""), fields(operation, spec)));
    }
  }
  document.getElementById("endpoints").replaceChildren(...blocks);
}
show();
