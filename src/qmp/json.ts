/**
 * QMP's JSON, as QEMU reads and writes it. Input is a stream, not newline-framed: a message ends when
 * its outermost brace or bracket closes (or with a scalar at top level), so one read may hold several
 * messages or part of one. Single-quoted strings are accepted as in QEMU. Errors carry QEMU's wording
 * ("expecting value", "missing : in object pair", "duplicate key", "invalid keyword 'x'") and the
 * stream recovers at the next message.
 */

type Token =
  | { t: 'punct'; v: '{' | '}' | '[' | ']' | ':' | ',' }
  | { t: 'string'; v: string }
  | { t: 'number'; v: number }
  | { t: 'keyword'; v: string }
  | { t: 'error'; v: string };

/**
 * The result of one message: a value, or a parse error message (without the "JSON parse error, " prefix),
 * or (`limit`) one of QEMU's limit messages, which it sends without that prefix.
 */
export type JsonMessage = { ok: true; value: unknown } | { ok: false; error: string; limit?: true };

const MAX_DEPTH = 1024;
/**
 * QEMU's limits on one message (json-streamer): the size of all its tokens together, their number, and
 * the nesting depth; past one the message is dropped with QEMU's error. The size bounds the memory an
 * endless message can make us hold.
 */
const MAX_MESSAGE_BYTES = 64 << 20;
const MAX_MESSAGE_TOKENS = 2 << 20;

export class JsonStreamParser {
  private tokens: Token[] = [];
  private depth = 0;
  /** Characters of the message so far (tokens and the partial one, not whitespace between them). */
  private bytes = 0;
  // Lexer state for a token split across chunks.
  private partial = '';
  private partialKind: 'none' | 'string' | 'number' | 'keyword' = 'none';
  private quote = '"';
  private escaped = false;

  constructor(
    private readonly onMessage: (m: JsonMessage) => void,
    /** The message size limit (tests make it small). */
    private readonly maxBytes = MAX_MESSAGE_BYTES,
  ) {}

  /** Feed a chunk of input (UTF-8 decoded text). */
  feed(text: string): void {
    for (let i = 0; i < text.length; i++) {
      if (this.partialKind === 'string' && !this.escaped) {
        // Fast path: take the run of plain characters up to the next quote or backslash at once.
        const quote = this.quote.charCodeAt(0);
        let end = i;
        for (let ch = text.charCodeAt(end); end < text.length && ch !== quote && ch !== 0x5c; ch = text.charCodeAt(++end));
        if (end > i && this.bytes + (end - i) <= this.maxBytes) {
          this.partial += text.slice(i, end);
          this.bytes += end - i;
          i = end - 1;
          continue;
        }
      }
      const c = text[i];
      const space = c === ' ' || c === '\t' || c === '\n' || c === '\r';
      if ((this.partialKind !== 'none' || !space) && ++this.bytes > this.maxBytes) {
        this.abort('JSON token size limit exceeded');
        continue;
      }
      if (this.partialKind === 'string') {
        this.partial += c;
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === this.quote) {
          this.pushToken(decodeString(this.partial));
          this.partialKind = 'none';
          this.partial = '';
        }
        continue;
      }
      if (this.partialKind === 'number' || this.partialKind === 'keyword') {
        if (this.partialKind === 'number' ? /[0-9eE+\-.]/.test(c) : /[a-zA-Z0-9_]/.test(c)) {
          this.partial += c;
          continue;
        }
        this.finishScalar();
      }
      if (space) continue;
      if (c === '"' || c === "'") {
        this.partialKind = 'string';
        this.quote = c;
        this.partial = c;
        this.escaped = false;
      } else if (c === '-' || (c >= '0' && c <= '9')) {
        this.partialKind = 'number';
        this.partial = c;
      } else if (/[a-zA-Z_]/.test(c)) {
        this.partialKind = 'keyword';
        this.partial = c;
      } else if (c === '{' || c === '[') {
        this.depth++;
        this.pushToken({ t: 'punct', v: c });
        if (this.depth > MAX_DEPTH) this.abort('JSON nesting depth limit exceeded');
      } else if (c === '}' || c === ']') {
        this.depth--;
        this.pushToken({ t: 'punct', v: c });
      } else if (c === ':' || c === ',') {
        this.pushToken({ t: 'punct', v: c });
      } else {
        this.pushToken({ t: 'error', v: `stray '${c}'` });
      }
    }
  }

  /** A top-level scalar waiting for its terminator (e.g. a number at end of input) is completed. */
  end(): void {
    if (this.partialKind === 'number' || this.partialKind === 'keyword') this.finishScalar();
  }

  private finishScalar(): void {
    const text = this.partial;
    const kind = this.partialKind;
    this.partialKind = 'none';
    this.partial = '';
    if (kind === 'number') {
      const n = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/.test(text) ? Number(text) : NaN;
      this.pushToken(Number.isNaN(n) ? { t: 'error', v: `invalid number '${text}'` } : { t: 'number', v: n });
    } else {
      this.pushToken({ t: 'keyword', v: text });
    }
  }

  private pushToken(tok: Token): void {
    this.tokens.push(tok);
    if (this.tokens.length > MAX_MESSAGE_TOKENS) return this.abort('JSON token count limit exceeded');
    // A message is complete when we are back at depth 0 (or went below it on a stray closer).
    if (this.depth <= 0) this.flush();
  }

  /** Drop the message with one of QEMU's limit errors. */
  private abort(reason: string): void {
    this.tokens = [];
    this.depth = 0;
    this.bytes = 0;
    this.partialKind = 'none';
    this.partial = '';
    this.onMessage({ ok: false, error: reason, limit: true });
  }

  private flush(): void {
    const tokens = this.tokens;
    this.tokens = [];
    this.depth = 0;
    this.bytes = 0;
    this.onMessage(parseTokens(tokens));
  }
}

function decodeString(raw: string): Token {
  // raw includes both quotes.
  const body = raw.slice(1, -1);
  // eslint-disable-next-line no-control-regex
  if (!/[\\\x00-\x1f]/.test(body)) return { t: 'string', v: body };
  let out = '';
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    if (c !== '\\') {
      if (c.charCodeAt(0) < 0x20) return { t: 'error', v: 'control character in string' };
      out += c;
      continue;
    }
    const e = body[++i];
    switch (e) {
      case '"':
      case "'":
      case '\\':
      case '/':
        out += e;
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'u': {
        const hex = body.slice(i + 1, i + 5);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) return { t: 'error', v: 'invalid hex escape sequence in string' };
        out += String.fromCharCode(parseInt(hex, 16));
        i += 4;
        break;
      }
      default:
        return { t: 'error', v: `invalid escape sequence in string` };
    }
  }
  return { t: 'string', v: out };
}

class ParseError extends Error {}

function parseTokens(tokens: Token[]): JsonMessage {
  let pos = 0;
  const fail = (msg: string): never => {
    throw new ParseError(msg);
  };
  const peek = (): Token | undefined => tokens[pos];
  const next = (): Token => {
    const t = tokens[pos++];
    if (!t) fail('premature EOI');
    if (t!.t === 'error') fail(t!.v as string);
    return t!;
  };
  const value = (): unknown => {
    const t = next();
    switch (t.t) {
      case 'string':
      case 'number':
        return t.v;
      case 'keyword':
        if (t.v === 'true') return true;
        if (t.v === 'false') return false;
        if (t.v === 'null') return null;
        return fail(`invalid keyword '${t.v}'`);
      case 'punct':
        if (t.v === '{') return obj();
        if (t.v === '[') return arr();
        return fail('expecting value');
    }
    return fail('expecting value');
  };
  const obj = (): Record<string, unknown> => {
    const out: Record<string, unknown> = Object.create(null);
    const first = peek();
    if (first && first.t === 'punct' && first.v === '}') {
      pos++;
      return { ...out };
    }
    for (;;) {
      const k = next();
      if (k.t !== 'string') {
        if (k.t === 'punct' && k.v === '}') fail('expecting value');
        fail('key is not a string in object');
      }
      const colon = next();
      if (!(colon.t === 'punct' && colon.v === ':')) fail('missing : in object pair');
      const v = value();
      if (Object.prototype.hasOwnProperty.call(out, k.v as string)) fail('duplicate key');
      out[k.v as string] = v;
      const sep = next();
      if (sep.t === 'punct' && sep.v === '}') break;
      if (!(sep.t === 'punct' && sep.v === ',')) fail('expected separator in dict');
    }
    return { ...out };
  };
  const arr = (): unknown[] => {
    const out: unknown[] = [];
    const first = peek();
    if (first && first.t === 'punct' && first.v === ']') {
      pos++;
      return out;
    }
    for (;;) {
      out.push(value());
      const sep = next();
      if (sep.t === 'punct' && sep.v === ']') break;
      if (!(sep.t === 'punct' && sep.v === ',')) fail('expected separator in list');
    }
    return out;
  };
  try {
    const v = value();
    if (pos < tokens.length) fail('expecting value');
    return { ok: true, value: v };
  } catch (err) {
    if (err instanceof ParseError) return { ok: false, error: err.message };
    throw err;
  }
}

/**
 * Encode a value as QEMU's monitor does: ", " and ": " separators, ASCII only (non-ASCII as \uXXXX),
 * one line. Integers stay integers; non-finite numbers cannot occur in QMP replies.
 */
export function encodeQmp(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return encodeString(v);
  if (typeof v === 'number') return Number.isFinite(v) ? String(v) : 'null';
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'bigint') return v.toString();
  if (Array.isArray(v)) return `[${v.map(encodeQmp).join(', ')}]`;
  if (typeof v === 'object') {
    const parts: string[] = [];
    for (const [k, val] of Object.entries(v as Record<string, unknown>)) {
      if (val === undefined) continue;
      parts.push(`${encodeString(k)}: ${encodeQmp(val)}`);
    }
    return `{${parts.join(', ')}}`;
  }
  return 'null';
}

function encodeString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += '\\\\';
    else if (c === 0x0a) out += '\\n';
    else if (c === 0x0d) out += '\\r';
    else if (c === 0x09) out += '\\t';
    else if (c === 0x08) out += '\\b';
    else if (c === 0x0c) out += '\\f';
    else if (c < 0x20 || c > 0x7e) out += '\\u' + c.toString(16).padStart(4, '0');
    else out += s[i];
  }
  return out + '"';
}
