// Drives the real TypeScript SDK (@anthropic-ai/sdk 1.x, tests/sdk/js/package.json)
// against the Charter gateway, as a user would. Run by tests/api/gateway_sdk.rs:
//   GATEWAY_URL=... TEST_ID=... REFUSAL=... node client.mjs
// See tests/sdk/client.py: the same scenarios, the same mock upstream. Prints
// `ok <scenario>` per scenario; exits non-zero on the first failure.

import Anthropic from '@anthropic-ai/sdk';

const env = process.env;
const ASK = [{ role: 'user', content: 'What is the capital of France?' }];

function client(scenario, options = {}) {
  return new Anthropic({
    baseURL: env.GATEWAY_URL,
    apiKey: 'sk-sdk-client',
    defaultHeaders: { 'x-test-id': `${env.TEST_ID}-${scenario}` },
    ...options,
  });
}

function expect(condition, what) {
  if (!condition) throw new Error(`assertion failed: ${typeof what === 'string' ? what : JSON.stringify(what)}`);
}

async function expectError(promise, check) {
  try {
    await promise;
  } catch (e) {
    check(e);
    return;
  }
  throw new Error('expected an error');
}

const scenarios = {
  async create() {
    const m = await client('create').messages.create({
      model: 'mock-plain', max_tokens: 64, messages: ASK,
      // @ts-ignore an unknown field, forwarded untouched
      charter_test_unknown: { kept: true },
    });
    expect(m.content[0].type === 'text' && m.content[0].text === env.PLAIN_TEXT, m);
    expect(m.stop_reason === 'end_turn', m);
    expect(m.usage.input_tokens === 12, m.usage);
    expect(m.charter.verdict === 'pass' && m.charter.action === 'none', m.charter);
  },

  async stream() {
    const s = client('stream').messages.stream({
      model: 'mock-rich', max_tokens: 256,
      messages: [{ role: 'user', content: "What's the weather in Paris?" }],
      tools: [{ name: 'get_weather', description: 'Weather', input_schema: { type: 'object' } }],
    });
    let streamed = '';
    s.on('text', (t) => { streamed += t; });
    const final = await s.finalMessage();
    expect(streamed === env.RICH_TEXT, streamed);
    expect(JSON.stringify(final.content.map((b) => b.type)) === '["thinking","text","tool_use"]', final.content);
    expect(final.content[1].text === env.RICH_TEXT, final);
    expect(JSON.stringify(final.content[2].input) === '{"city":"Paris","unit":"celsius"}', final.content[2]);
    expect(final.stop_reason === 'tool_use', final.stop_reason);
  },

  async count_tokens() {
    const r = await client('count').messages.countTokens({ model: 'mock-plain', messages: ASK });
    expect(r.input_tokens === 17, r);
  },

  async models() {
    const c = client('models');
    const ids = [];
    for await (const m of c.models.list({ limit: 1 })) ids.push(m.id);
    expect(JSON.stringify(ids) === '["claude-mock-1","claude-mock-2"]', ids);
    expect((await c.models.retrieve('claude-mock-2')).id === 'claude-mock-2', 'retrieve');
  },

  async blocked_prompt() {
    const m = await client('blocked-prompt').messages.create({
      model: 'mock-plain', max_tokens: 64,
      messages: [{ role: 'user', content: env.PIPE_BOMB_PROMPT }],
    });
    expect(m.stop_reason === 'refusal', m);
    expect(m.content[0].text === env.REFUSAL, m);
    expect(m.charter.failed === 'prompt', m.charter);
  },

  async blocked_output() {
    const m = await client('blocked-output').messages.create({ model: 'mock-harmful', max_tokens: 64, messages: ASK });
    expect(m.stop_reason === 'refusal' && m.content[0].text === env.REFUSAL, m);
    expect(!JSON.stringify(m).includes('gunpowder'), m);
    const final = await client('blocked-output-stream').messages
      .stream({ model: 'mock-harmful', max_tokens: 64, messages: ASK })
      .finalMessage();
    expect(final.stop_reason === 'refusal', final);
    expect(final.content[final.content.length - 1].text === env.REFUSAL, final);
    expect(!JSON.stringify(final).includes('gunpowder'), final);
  },

  async revised_output() {
    const m = await client('revised').messages.create({
      model: 'mock-privacy', max_tokens: 256,
      messages: [{ role: 'user', content: 'Where does she live?' }],
    });
    expect(m.content[0].text === env.REVISION_TEXT, m);
    expect(m.charter.action === 'revise' && m.charter.revise_rounds === 1, m.charter);
    expect(m.charter.extra_usage.input_tokens > 0, m.charter);
  },

  async midstream_block() {
    const final = await client('midstream-block').messages
      .stream({ model: 'mock-long-harmful', max_tokens: 512, messages: ASK })
      .finalMessage();
    expect(final.stop_reason === 'refusal', final);
    expect(final.content.length === 2, final.content);
    const released = final.content[0].text;
    expect(released.length > 0 && !released.includes('pipe'), released);
    expect(final.content[1].text === env.REFUSAL, final.content[1]);
  },

  async rate_limited() {
    await expectError(
      client('429', { maxRetries: 2 }).messages.create({ model: 'mock-429', max_tokens: 8, messages: ASK }),
      (e) => {
        expect(e instanceof Anthropic.RateLimitError, `${e.constructor.name}: ${e}`);
        expect(e.status === 429, e.status);
        expect(e.headers.get('retry-after') === '1', 'retry-after');
        expect(e.error.error.type === 'rate_limit_error', e.error);
      },
    );
  },

  async overloaded() {
    await expectError(
      client('529', { maxRetries: 2 }).messages.create({ model: 'mock-529', max_tokens: 8, messages: ASK }),
      (e) => {
        expect(e instanceof Anthropic.InternalServerError, `${e.constructor.name}: ${e}`);
        expect(e.status === 529, e.status);
        expect(e.error.error.type === 'overloaded_error', e.error);
      },
    );
  },

  async midstream_error() {
    await expectError(
      client('midstream-error').messages
        .stream({ model: 'mock-midstream-error', max_tokens: 64, messages: ASK })
        .finalMessage(),
      (e) => {
        expect(e instanceof Anthropic.APIError, `${e.constructor.name}: ${e}`);
        expect(String(e.message).includes('overloaded_error') || e.type === 'overloaded_error', e.message);
      },
    );
  },

  // After each outcome, the answer appended to the history is accepted next turn (the
  // mock rejects what the real API rejects, e.g. an empty text block).
  async next_turn() {
    const cases = [
      ['pass', 'sk-sdk-client', 'mock-plain', 'none', 'none'],
      ['flag', env.FLAG_KEY, 'mock-harmful', 'flag', 'flag'],
      ['block', 'sk-sdk-client', 'mock-harmful', 'block', 'block'],
      ['block-late', 'sk-sdk-client', 'mock-long-harmful', 'block', 'block'],
      ['revise', 'sk-sdk-client', 'mock-privacy', 'revise', 'block'],
    ];
    for (const [name, apiKey, model, created, streamed] of cases) {
      const c = client(`turns-${name}`, { apiKey });
      const first = await c.messages.create({ model, max_tokens: 256, messages: ASK });
      const final = await c.messages.stream({ model, max_tokens: 256, messages: ASK }).finalMessage();
      expect(first.charter.action === created, [name, first.charter]);
      // A stream's metadata rides on message_delta, which the SDK does not keep.
      expect((final.stop_reason === 'refusal') === (streamed === 'block'), [name, final]);
      for (const message of [first, final]) {
        expect(message.content.every((b) => b.type !== 'text' || b.text.trim() !== ''), message);
        expect(message.usage.output_tokens > 1, [name, message.usage]);
        const history = [
          ...ASK,
          { role: 'assistant', content: message.content },
          { role: 'user', content: 'Thanks. What else is worth seeing there?' },
        ];
        const reply = await c.messages.create({ model: 'mock-plain', max_tokens: 64, messages: history });
        expect(reply.content[0].text === env.PLAIN_TEXT, reply);
      }
    }
  },
};

const { VERSION } = await import('@anthropic-ai/sdk/version');
console.log(`@anthropic-ai/sdk ${VERSION}`);
for (const [name, run] of Object.entries(scenarios)) {
  try {
    await run();
  } catch (e) {
    console.log(`FAILED ${name}: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
}
