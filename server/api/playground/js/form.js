// form.js: builds labelled form controls from the JSON schemas GET /v1/capabilities reports
// (numbers with their bounds, booleans, enums, lists, nested option objects, adapter and
// store pickers) and reads them back into request values. An empty control means "leave it
// to the server's default", so only what the user set is sent. It knows no method by name.

let uid = 0;
const nextId = (base) => `f-${base.replace(/[^a-z0-9]+/gi, "-")}-${++uid}`;

export function humanize(name) {
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

// {schema without null, nullable}; `anyOf: [X, null]` is how pydantic writes `X | None`.
export function unwrap(schema) {
  if (!schema.anyOf) return { schema, nullable: false };
  const rest = schema.anyOf.filter((s) => s.type !== "null");
  const nullable = rest.length < schema.anyOf.length;
  const base = rest.length === 1 ? { ...rest[0] } : { anyOf: rest };
  for (const k of ["default", "title", "description"]) if (schema[k] !== undefined) base[k] = schema[k];
  return { schema: base, nullable };
}

function bounds(schema) {
  const parts = [];
  const lo = schema.minimum ?? schema.exclusiveMinimum;
  const hi = schema.maximum ?? schema.exclusiveMaximum;
  if (lo !== undefined) parts.push(`${schema.exclusiveMinimum !== undefined ? ">" : "≥"} ${lo}`);
  if (hi !== undefined) parts.push(`≤ ${hi}`);
  return parts.join(", ");
}

function hint(schema) {
  const bits = [];
  if (schema.default !== undefined && schema.default !== null) bits.push(`default ${JSON.stringify(schema.default)}`);
  const b = bounds(schema);
  if (b) bits.push(b);
  return bits.join("; ");
}

function field(label, control, note) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  const lab = document.createElement("label");
  lab.htmlFor = control.id;
  lab.textContent = label;
  wrap.append(lab, control);
  if (note) {
    const small = document.createElement("small");
    small.id = `${control.id}-hint`;
    small.textContent = note;
    control.setAttribute("aria-describedby", small.id);
    wrap.append(small);
  }
  return wrap;
}

function parseList(text) {
  const items = text.split(",").map((s) => s.trim()).filter(Boolean);
  return items.map((s) => (/^-?\d+(\.\d+)?$/.test(s) ? Number(s) : s));
}

// Pickers: `ctx.picker(path)` returns {options: [[value, label]...], kind} or null.
function pickerControl(path, schema, options) {
  const sel = document.createElement("select");
  sel.id = nextId(path);
  sel.dataset.path = path;
  const fill = (opts) => {
    const keep = sel.value;
    sel.replaceChildren();
    if (schema.default === undefined || schema.default === null) {
      sel.append(new Option("(choose)", ""));
    }
    for (const [value, label] of opts) sel.append(new Option(label, value));
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
    else if (schema.default) sel.value = String(schema.default);
  };
  fill(options);
  return { el: sel, read: () => sel.value || undefined, refill: fill };
}

// A control for one schema; returns {el, read(), set(v), refills: [fn]}.
export function control(path, rawSchema, ctx) {
  const { schema } = unwrap(rawSchema);
  const label = humanize(path.split(".").pop());
  const picked = ctx.picker(path, schema);
  if (picked) {
    const p = pickerControl(path, schema, picked.options);
    ctx.onRefill(path, p.refill);
    return { el: field(label, p.el, picked.note), read: p.read, set: (v) => { p.el.value = v; } };
  }
  if (schema.type === "object" && schema.properties) return objectControl(path, schema, ctx, label);
  let input;
  let read;
  if (schema.type === "boolean") {
    input = document.createElement("select");
    input.append(new Option(`default (${schema.default ? "on" : "off"})`, ""), new Option("on", "true"),
      new Option("off", "false"));
    read = () => (input.value === "" ? undefined : input.value === "true");
  } else if (schema.enum) {
    input = document.createElement("select");
    if (schema.default === undefined || schema.default === null) input.append(new Option("(default)", ""));
    for (const v of schema.enum) input.append(new Option(String(v), String(v)));
    if (schema.default !== undefined && schema.default !== null) input.value = String(schema.default);
    read = () => input.value || undefined;
  } else if (schema.type === "integer" || schema.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.inputMode = schema.type === "integer" ? "numeric" : "decimal";
    input.step = schema.type === "integer" ? "1" : "any";
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    if (schema.default !== undefined && schema.default !== null) input.placeholder = String(schema.default);
    read = () => (input.value === "" ? undefined : Number(input.value));
  } else {
    // Strings, lists and unions (e.g. `"low" | "high" | [int]`): one text box, parsed.
    input = document.createElement("input");
    input.type = "text";
    const enums = (schema.anyOf || []).flatMap((s) => s.enum || []);
    const isList = schema.type === "array" || (schema.anyOf || []).some((s) => s.type === "array");
    if (enums.length || isList) input.placeholder = [...enums, isList ? "1, 2, 3" : null].filter(Boolean).join(" | ");
    else if (schema.default !== undefined && schema.default !== null) input.placeholder = String(schema.default);
    read = () => {
      const text = input.value.trim();
      if (!text) return undefined;
      if (enums.includes(text) || (!isList && schema.type === "string")) return text;
      return isList ? parseList(text) : text;
    };
  }
  input.id = nextId(path);
  input.dataset.path = path;
  const set = (v) => { input.value = Array.isArray(v) ? v.join(", ") : String(v); };
  return { el: field(label, input, hint(schema)), read, set };
}

function objectControl(path, schema, ctx, label) {
  const box = document.createElement("fieldset");
  box.className = "sub";
  const legend = document.createElement("legend");
  legend.textContent = label;
  box.append(legend);
  const parts = {};
  for (const [name, sub] of Object.entries(schema.properties)) {
    parts[name] = control(`${path}.${name}`, sub, ctx);
    box.append(parts[name].el);
  }
  const read = () => {
    const out = {};
    for (const [name, part] of Object.entries(parts)) {
      const v = part.read();
      if (v !== undefined) out[name] = v;
    }
    return out;
  };
  const set = (v) => {
    for (const [name, value] of Object.entries(v || {})) if (parts[name]) parts[name].set(value);
  };
  return { el: box, read, set };
}
