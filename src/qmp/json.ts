/**
 * QMP's JSON, as QEMU 7.2 reads and writes it. Input is a stream, not newline-framed: a message ends when
 * its outermost brace or bracket closes (or with a scalar at top level), so one read may hold several
 * messages or part of one. Single-quoted strings are accepted as in QEMU. Errors carry QEMU's wording
 * ("expecting value", "missing : in object pair", "duplicate key", "invalid keyword 'x'", "stray 'x'")
 * and the stream recovers as QEMU's does.
 *
 * Two kinds of errors, as in QEMU (qobject/json-lexer.c, json-streamer.c, json-parser.c):
 * - a lexer error (a character that cannot continue the token: "stray '<token so far>'") ends the
 *   message at once; input is then skipped up to a structural character ([ ] { } : ,) or an ASCII
 *   control character other than tab, where lexing starts afresh;
 * - a grammar or string error is reported when the message's brackets have closed.
 * Input bytes come through Utf8StreamDecoder, which keeps invalid UTF-8 visible (see there): inside a
 * string it is "invalid UTF-8 sequence in string", bytes 0xFE and 0xFF are lexer errors anywhere.
 */
import { qdictOrder } from '../base/qdict.js';

type Token =
  | { t: 'punct'; v: '{' | '}' | '[' | ']' | ':' | ',' }
  | { t: 'string'; v: string }
  | { t: 'number'; v: number | bigint }
  | { t: 'keyword'; v: string }
  | { t: 'error'; v: string };

/** Punctuation tokens are shared: a message of millions of commas costs no object per comma. */
const PUNCT = Object.fromEntries((['{', '}', '[', ']', ':', ','] as const).map((v) => [v, { t: 'punct', v }])) as Record<string, Token>;

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

/**
 * An input byte that is not part of valid UTF-8 is decoded to a lone low surrogate U+DC00+byte (as
 * Python's "surrogateescape"): valid UTF-8 never yields one, so the lexer can tell such bytes apart
 * from every real character, and report them as QEMU does.
 */
const INVALID_BYTE_BASE = 0xdc00;
const isInvalidByte = (code: number) => code >= 0xdc80 && code <= 0xdcff;
/** 0xFE and 0xFF never occur in UTF-8; QEMU's lexer refuses them even inside strings. */
const isImpossibleByte = (code: number) => code === INVALID_BYTE_BASE + 0xfe || code === INVALID_BYTE_BASE + 0xff;

/** A number's lexer state, following JSON's grammar (RFC 8259) as QEMU's lexer does. */
type NumberState = 'minus' | 'zero' | 'int' | 'dot' | 'frac' | 'exp' | 'exp-sign' | 'exp-digits';

export class JsonStreamParser {
  private tokens: Token[] = [];
  private depth = 0;
  /** Characters of the message so far (tokens and the partial one, not whitespace between them). */
  private bytes = 0;
  // Lexer state: the token being read, which may be split across chunks.
  private state: 'start' | 'string' | 'number' | 'keyword' | 'recovery' = 'start';
  private partial = '';
  private quote = '"';
  private escaped = false;
  private numberState: NumberState = 'int';

  constructor(
    private readonly onMessage: (m: JsonMessage) => void,
    /** The message size limit (tests make it small). */
    private readonly maxBytes = MAX_MESSAGE_BYTES,
    /**
     * Numbers typed as QEMU's parser types them (the monitor's input): an integer that a double cannot
     * hold exactly but an int64 or uint64 can stays exact, as a bigint; see jsonNumber.
     */
    private readonly exactIntegers = false,
  ) {}

  /** Feed a chunk of input (text from Utf8StreamDecoder, or any string). */
  feed(text: string): void {
    for (let i = 0; i < text.length; i++) {
      if (this.state === 'string' && !this.escaped) {
        // Fast path: take the run of plain characters up to the next quote, backslash or control character.
        let end = i;
        for (let ch = text.charCodeAt(end); end < text.length && ch !== this.quote.charCodeAt(0) && ch !== 0x5c && ch >= 0x20 && !isImpossibleByte(ch); ch = text.charCodeAt(++end));
        if (end > i && this.bytes + (end - i) <= this.maxBytes) {
          this.partial += text.slice(i, end);
          this.bytes += end - i;
          i = end - 1;
          continue;
        }
      }
      this.lexChar(text[i]);
    }
  }

  /** A top-level scalar waiting for its terminator (e.g. a number at end of input) is completed. */
  end(): void {
    if (this.state === 'number' || this.state === 'keyword') this.finishScalar();
  }

  private lexChar(c: string): void {
    const code = c.charCodeAt(0);
    const isSpace = c === ' ' || c === '\t' || c === '\n' || c === '\r';
    if (this.state === 'recovery') {
      // Skip to where a new token can safely start; that character is then read afresh.
      if (!('[]{}:,'.includes(c) || (code < 0x20 && c !== '\t') || isImpossibleByte(code))) return;
      this.state = 'start';
    }
    if ((this.state !== 'start' || !isSpace) && ++this.bytes > this.maxBytes) return this.abort('JSON token size limit exceeded');
    switch (this.state) {
      case 'string':
        this.partial += c;
        if (code < 0x20 || isImpossibleByte(code)) return this.lexError();
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === this.quote) {
          const raw = this.partial;
          this.state = 'start';
          this.partial = '';
          this.pushToken(decodeString(raw));
        }
        return;
      case 'number':
        if (this.continueNumber(c)) return;
        break;
      case 'keyword':
        if (c >= 'a' && c <= 'z') {
          this.partial += c;
          return;
        }
        this.finishScalar();
        break;
    }
    // A new token starts with c.
    if (isSpace) return;
    if (c === '"' || c === "'") {
      this.state = 'string';
      this.quote = c;
      this.partial = c;
      this.escaped = false;
    } else if (c === '-' || (c >= '0' && c <= '9')) {
      this.state = 'number';
      this.partial = c;
      this.numberState = c === '-' ? 'minus' : c === '0' ? 'zero' : 'int';
    } else if (c >= 'a' && c <= 'z') {
      this.state = 'keyword';
      this.partial = c;
    } else if (c === '{' || c === '[') {
      this.depth++;
      this.pushToken(PUNCT[c]);
      if (this.depth > MAX_DEPTH) this.abort('JSON nesting depth limit exceeded');
    } else if (c === '}' || c === ']') {
      this.depth--;
      this.pushToken(PUNCT[c]);
    } else if (c === ':' || c === ',') {
      this.pushToken(PUNCT[c]);
    } else {
      this.lexError(c);
    }
  }

  /** Take c into the number being read; false when c ends it (c is then read as the next token). */
  private continueNumber(c: string): boolean {
    const digit = c >= '0' && c <= '9';
    const next = ((): NumberState | 'end' | 'error' => {
      switch (this.numberState) {
        case 'minus':
          return c === '0' ? 'zero' : digit ? 'int' : 'error';
        case 'zero':
          return c === '.' ? 'dot' : digit ? 'error' : 'end';
        case 'int':
          return digit ? 'int' : c === '.' ? 'dot' : c === 'e' || c === 'E' ? 'exp' : 'end';
        case 'dot':
          return digit ? 'frac' : 'error';
        case 'frac':
          return digit ? 'frac' : c === 'e' || c === 'E' ? 'exp' : 'end';
        case 'exp':
          return c === '+' || c === '-' ? 'exp-sign' : digit ? 'exp-digits' : 'error';
        case 'exp-sign':
          return digit ? 'exp-digits' : 'error';
        case 'exp-digits':
          return digit ? 'exp-digits' : 'end';
      }
    })();
    if (next === 'error') {
      this.lexError(c);
      return true;
    }
    if (next === 'end') {
      this.finishScalar();
      return false;
    }
    this.numberState = next;
    this.partial += c;
    return true;
  }

  /**
   * A character that cannot continue the token: the message ends at once with QEMU's "stray" error
   * showing the token so far (with the character, if given, appended), and input is skipped.
   */
  private lexError(c?: string): void {
    let text = this.partial;
    // QEMU sees bytes: the first byte of a multi-byte character cannot be shown, nor can an invalid one.
    if (c !== undefined) text += c.charCodeAt(0) >= 0x80 ? '\ufffd' : c;
    // QEMU's message is a C string: it ends at a NUL.
    text = text.replace(/[\udc80-\udcff]/g, '\ufffd').split('\0')[0];
    this.tokens = [];
    this.depth = 0;
    this.bytes = 0;
    this.partial = '';
    this.state = 'recovery';
    this.onMessage({ ok: false, error: `stray '${text}'` });
  }

  private finishScalar(): void {
    const text = this.partial;
    const kind = this.state;
    this.state = 'start';
    this.partial = '';
    // The lexer only lets a number through that matches JSON's grammar.
    this.pushToken(kind === 'number' ? { t: 'number', v: this.exactIntegers ? jsonNumber(text) : Number(text) } : { t: 'keyword', v: text });
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
    this.state = 'start';
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

/**
 * Decodes a string token (both quotes included) with QEMU's checks and messages: escapes, UTF-16
 * surrogate pairs in \u escapes (a lone surrogate is refused), invalid UTF-8. The two bytes C0 80 are
 * U+0000, as in QEMU's "modified UTF-8".
 */
function decodeString(raw: string): Token {
  const body = raw.slice(1, -1);
  if (!/[\\\udc80-\udcff]/.test(body)) return { t: 'string', v: body };
  const hex4 = (at: number) => (/^[0-9a-fA-F]{4}$/.test(body.slice(at, at + 4)) ? parseInt(body.slice(at, at + 4), 16) : -1);
  let out = '';
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    const code = body.charCodeAt(i);
    if (isInvalidByte(code)) {
      if (code === INVALID_BYTE_BASE + 0xc0 && body.charCodeAt(i + 1) === INVALID_BYTE_BASE + 0x80) {
        out += '\0';
        i++;
        continue;
      }
      return { t: 'error', v: 'invalid UTF-8 sequence in string' };
    }
    if (c !== '\\') {
      out += c;
      continue;
    }
    const e = body[++i];
    const simple: Record<string, string> = { '"': '"', "'": "'", '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
    if (e in simple) {
      out += simple[e];
      continue;
    }
    if (e !== 'u') return { t: 'error', v: 'invalid escape sequence in string' };
    // QEMU names the escape as written, six characters from the backslash (fewer at the string's end).
    const escape = raw.slice(i, i + 6);
    let cp = hex4(i + 1);
    i += 4;
    if (cp >= 0xd800 && cp <= 0xdbff && body.startsWith('\\u', i + 1)) {
      const low = hex4(i + 3);
      if (low >= 0xdc00 && low <= 0xdfff) {
        cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
        i += 6;
      } else cp = -1;
    }
    if (cp < 0 || (cp >= 0xd800 && cp <= 0xdfff)) return { t: 'error', v: `${escape.replace(/[\udc80-\udcff]/g, '\ufffd')} is not a valid Unicode character` };
    out += String.fromCodePoint(cp);
  }
  return { t: 'string', v: out };
}

/**
 * Decodes a byte stream as UTF-8, keeping every byte that is not part of a valid sequence as
 * U+DC00+byte (see INVALID_BYTE_BASE) instead of replacing it, so the JSON lexer can refuse it as QEMU
 * does. A sequence split across chunks is completed by the next chunk.
 */
/**
 * One JSON text parsed as the monitor parses its input (numbers typed as QEMU's parser types them):
 * for JSON that the schema visitor then checks outside QMP (the command line's --blockdev {…}).
 * Throws an Error with the parser's message when the text is not one JSON value.
 */
export function parseJsonText(text: string): unknown {
  const messages: JsonMessage[] = [];
  const parser = new JsonStreamParser((m) => messages.push(m), undefined, true);
  parser.feed(text);
  parser.end();
  const [m] = messages;
  if (!m) throw new Error('premature EOI');
  if (!m.ok) throw new Error(m.error);
  if (messages.length > 1) throw new Error('more than one JSON value');
  return m.value;
}

export class Utf8StreamDecoder {
  private pending: Buffer = Buffer.alloc(0);

  decode(chunk: Buffer): string {
    const bytes = this.pending.length > 0 ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = Buffer.alloc(0);
    let out = '';
    let i = 0;
    while (i < bytes.length) {
      // Runs of ASCII, the common case, are taken at once.
      let end = i;
      while (end < bytes.length && bytes[end] < 0x80) end++;
      if (end > i) {
        out += bytes.toString('latin1', i, end);
        i = end;
        continue;
      }
      const lead = bytes[i];
      // RFC 3629: the number of continuation bytes and the range of the first one (no overlongs, no
      // surrogates, nothing past U+10FFFF).
      const [count, low, high] =
        lead >= 0xc2 && lead <= 0xdf ? [1, 0x80, 0xbf] : lead === 0xe0 ? [2, 0xa0, 0xbf] : lead === 0xed ? [2, 0x80, 0x9f] : lead >= 0xe1 && lead <= 0xef ? [2, 0x80, 0xbf] : lead === 0xf0 ? [3, 0x90, 0xbf] : lead >= 0xf1 && lead <= 0xf3 ? [3, 0x80, 0xbf] : lead === 0xf4 ? [3, 0x80, 0x8f] : [0, 0, 0];
      let valid = count > 0;
      for (let k = 1; valid && k <= count; k++) {
        if (i + k >= bytes.length) {
          // Cut off by the end of the chunk: wait for the rest.
          this.pending = Buffer.from(bytes.subarray(i));
          return out;
        }
        const b = bytes[i + k];
        valid = k === 1 ? b >= low && b <= high : b >= 0x80 && b <= 0xbf;
      }
      if (!valid) {
        out += String.fromCharCode(INVALID_BYTE_BASE + lead);
        i++;
        continue;
      }
      out += bytes.toString('utf8', i, i + count + 1);
      i += count + 1;
    }
    return out;
  }

  /** Bytes of a sequence cut off at the end of the last chunk. */
  get pendingBytes(): number {
    return this.pending.length;
  }

  /** At the end of input, a sequence still waiting for its continuation bytes is invalid. */
  end(): string {
    const rest = [...this.pending].map((b) => String.fromCharCode(INVALID_BYTE_BASE + b)).join('');
    this.pending = Buffer.alloc(0);
    return rest;
  }
}

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/**
 * A number token's value as QEMU's parser gives it: integer syntax within int64 or uint64 is an
 * integer (a bigint where a double would round it), anything else a double (a fraction, an exponent,
 * or an integer beyond 64 bits). So an integer argument gets the integer that was sent or, if none
 * fits, a value no integer check passes (a double that is no safe integer), as QEMU refuses it.
 * A double that happens to be a safe integer (1.0, 1e3) stays indistinguishable from an integer.
 */
function jsonNumber(text: string): number | bigint {
  const n = Number(text);
  if (Number.isSafeInteger(n) || !/^-?\d+$/.test(text)) return n;
  const big = BigInt(text);
  return big >= INT64_MIN && big <= UINT64_MAX ? big : n;
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
 * Encode a value as QEMU's monitor does: ", " and ": " separators, ASCII only (non-ASCII as \uXXXX,
 * upper-case hex digits as QEMU's),
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
    // Members in the order QEMU prints them (its QDict's), so that output compares as text too.
    const obj = v as Record<string, unknown>;
    const parts: string[] = [];
    for (const k of qdictOrder(Object.keys(obj))) {
      if (obj[k] === undefined) continue;
      parts.push(`${encodeString(k)}: ${encodeQmp(obj[k])}`);
    }
    return `{${parts.join(', ')}}`;
  }
  return 'null';
}

const SHORT_ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t', '\b': '\\b', '\f': '\\f' };

function encodeString(s: string): string {
  // One regex pass keeps the result a flat string: appending character by character would build a
  // rope of one node per character (hundreds of MiB for a multi-MiB id echoed back).
  // eslint-disable-next-line no-control-regex
  const escaped = s.replace(/["\\\x00-\x1f\x7f-\uffff]/g, (c) => SHORT_ESCAPES[c] ?? '\\u' + c.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0'));
  return `"${escaped}"`;
}
