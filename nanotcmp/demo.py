"""
The embedded demo corpus: synthetic dialogues with text, prosody and an emotion label per utterance.

The generative story of a dialogue:
1. Cast: a woman and a man. Their names label the speakers in the data and are never said; every
   woman speaks with one voice and every man with another, so a voice tells whose turn it is, and
   nothing about which dialogue it is.
2. Mood: a slow, hidden mood (conflict, calm or friendly) says which emotion people drift to when
   their feeling changes; now and then (FLIP a turn) it is drawn afresh.
3. Turns: speakers mostly alternate. At each turn the speaker's hidden emotion takes a Markov step:
   it stays (PERSISTENCE), or catches the emotion the partner last expressed (CONTAGION), or is
   drawn from the mood. The utterance's label is the new emotion.
4. Words: a reply to the partner's last utterance, whose words depend on the partner's emotion and
   one's own ("Calm down." to an upset partner when one is calm; never one the dialogue has had
   before), then a sentence of one's own emotion, its slots (topic, thing, person, place, time)
   drawn afresh for each utterance from lists every dialogue shares. One utterance in five (FILLER)
   is a neutral-worded question with no reply, whatever the emotion: the text is no perfect oracle.
5. Voice: prosody follows the emotion, with noise, on top of the speaker's voice: positive is
   higher, more variable and faster; negative lower, louder and slower; neutral quiet and even.
So nothing in an utterance says which dialogue it belongs to: what links it to its history is its
emotion, its speaker's turn and its reply to the partner. A speaker's next emotion depends on their
last one, the partner's last one, and a mood that only a longer history reveals: the distant
context says what the last two utterances do not.
"""
import bisect
import itertools
import math
import re

import numpy as np

from nanotcmp.audio import SAMPLE_RATE

DEMO_LABELS = ("negative", "neutral", "positive")
WOMEN = ("Anna", "Beth", "Clara", "Dana", "Emma", "Fiona")
MEN = ("Ben", "Carl", "David", "Eric", "Frank", "George")
VOICES = {"woman": ((1.1, 1.12, 1.08), 205.0), "man": ((0.94, 0.95, 0.97), 115.0)}  # formant scalings, pitch
MOOD_ODDS = (0.3, 0.4, 0.3)  # how often each mood is drawn: conflict, calm, friendly
EMOTION_ODDS = ((0.8, 0.15, 0.05), (0.1, 0.8, 0.1), (0.05, 0.15, 0.8))  # p(label | mood)
FLIP = 0.03  # chance a turn that the mood is drawn afresh
PERSISTENCE = 0.1  # chance a speaker keeps their emotion at a turn
CONTAGION = 0.1  # when an emotion changes: chance it becomes the partner's last one
ALTERNATE = 0.85  # chance the next turn goes to the other speaker
FILLER, REPLY = 0.2, 0.85  # chance of a neutral-worded filler; of a reply before one's own sentence
# prosody per label (negative, neutral, positive): log-pitch shift and spread, energy, tempo
PITCH_SHIFT, PITCH_SD = (-0.15, 0.0, 0.18), (0.06, 0.04, 0.08)
ENERGY, TEMPO = (0.7, 0.45, 0.66), (0.85, 1.0, 1.18)

# the words: slot fillers, sentences of each emotion, replies, neutral-worded fillers
TOPICS = ("the wedding | the new job | the move | the exam | the party | the trip | the apartment | "
          "the band | the audition | the holidays | the baby | the old car | the garden | the dinner").split(" | ")
THINGS = ("laptop | camera | guitar | sweater | cake | phone | couch | ring | bike | lamp | painting | "
          "umbrella | jacket | necklace | watch | mirror").split(" | ")
PEOPLE = ("my mother | your brother | the landlord | my boss | Aunt Carol | our neighbour | your sister | "
          "Grandpa | the new guy | my roommate | your father | Uncle Joe | my cousin").split(" | ")
PLACES = ("the diner | the beach | the mall | the park | the museum | the gym | the coffee house | "
          "the airport | the cinema | the office | the bakery | the station | the library").split(" | ")
TIMES = ("tonight | tomorrow | on Friday | this weekend | next week | after work | on Sunday").split(" | ")
NEGATIVE = (
    "I can't believe you lost my {thing} again. | {topic} is a disaster. | I'm sick of hearing about {topic}. | "
    "{person} ruined {topic}, as usual. | Why do you always do this to me? | I'm worried {topic} is falling apart. | "
    "I don't want to go to {place} {time}. | You never listen to a word I say. | I feel terrible about the {thing}. | "
    "I told you the {thing} was broken. | Another problem with {topic}. | I'm so angry at {person}. | "
    "How could {person} be so cruel? | Nothing ever works out for us. | I hate {place}. | "
    "You promised to fix the {thing}. | That's the worst idea ever. | I'm done with {topic}. | "
    "Who threw away my {thing}? | I can't do this anymore. | Never bring up {topic} again. | "
    "It's all my fault. | {person} lied to us. | It's a mess at {place}.").split(" | ")
NEUTRAL = (
    "I think {topic} is {time}. | I called {person} about the {thing}. | Let me check if I'm free {time}. | "
    "We could meet at {place} {time}. | {place} is open {time}. | I put the {thing} on the table. | "
    "{person} is coming over {time}. | I'm not sure what {topic} involves yet. | Pass me the {thing}, please. | "
    "I'll look into {topic} {time}. | We need two more chairs for {topic}. | I locked the front door. | "
    "It's supposed to rain {time}. | I read about {topic} this morning. | Let's decide on {topic} {time}. | "
    "The {thing} goes in the closet. | {person} parked the car outside. | I will ask {person} {time}. | "
    "I wrote down the address of {place}. | We could order food {time}. | The meeting moved to Thursday. | "
    "I'll text you the details. | We usually go to {place} on Sundays. | The {thing} is still at {place}.").split(" | ")
POSITIVE = (
    "That's wonderful news about {topic}! | I love how {topic} turned out. | You made my day with the {thing}! | "
    "{person} is going to be thrilled. | This is the best {thing} ever! | I knew you'd pull it off, great job! | "
    "I'm so excited about {topic}! | That's so sweet of {person}! | We should celebrate {time} at {place}! | "
    "Everything about {topic} feels right. | You're the best, seriously. | I can't stop smiling about the {thing}. | "
    "That sounds like so much fun! | Finally some good news about {topic}! | I'm so proud of you. | "
    "The {thing} is perfect, I love it. | This is the nicest thing {person} has done. | "
    "I can't wait to tell {person}! | "
    "Great idea, let's go to {place}! | That's hilarious! | {topic} is going better than I hoped. | "
    "Thank you so much for the {thing}! | What a lovely surprise! | You always cheer me up.").split(" | ")
FILLERS = (
    "So, about {topic}, where were we? | What did {person} say about the {thing}? | Tell me more about {place}. | "
    "Let me think about {topic} for a second. | And then what happened at {place}? | "
    "The {thing} from {place}, remember? | What does {person} think about {topic}? | "
    "You mean the {thing} that {person} brought? | Shall we talk about {topic} with {person} {time}?").split(" | ")
TEMPLATES = (NEGATIVE, NEUTRAL, POSITIVE)
# REPLIES[partner's emotion][one's own]: what one says first, to the partner's last utterance
REPLIES = [[replies.split(" | ") for replies in row] for row in (
    ("Don't start with me. | Oh, so it's my fault now? | Yeah, well, me neither. | Great, now you're upset too. | "
     "Don't yell at me. | Stop complaining.",
     "Okay, calm down. | Let's not fight. | Take a breath. | I hear you. | Let's talk it through. | Slow down.",
     "Hey, cheer up! | Come on, smile! | It's not that bad! | Aw, don't worry! | Look on the bright side! | "
     "Hug?"),
    ("That's not the point. | Who cares? | Ugh, seriously? | So what? | Whatever. | Not this again.",
     "Okay. | Sure. | Right. | I see. | Hmm. | Got it.",
     "Oh, good question! | Ooh, tell me! | Ha, yes! | Oh, fun! | Love that! | Sounds great!"),
    ("Easy for you to say. | Good for you, I guess. | Spare me. | Must be nice. | Don't rub it in. | "
     "Lucky you.",
     "Oh, nice. | Good to hear. | Alright then. | Fair enough. | Noted. | If you say so.",
     "I know, right? | Me too! | Yes, exactly! | Wow, amazing! | So happy for you! | Yay!"))]


def pick(seq, rng):
    return seq[int(rng.random() * len(seq))]


def draw(odds, rng):
    """An index drawn with the given probabilities, as rng.choice(len(odds), p=odds) but 8x faster."""
    return bisect.bisect(list(itertools.accumulate(odds)), rng.random() * sum(odds))


def fresh(choices, said, rng):
    """One of choices that is not in said (the replies a dialogue has made so far), which it joins;
    None when every one was said: nobody repeats a reply, so its words do not tie it to its dialogue."""
    left = [c for c in choices if c not in said]
    if not left:
        return None
    said.add(choice := pick(left, rng))
    return choice


def utterance(sex, label, partner_label, said, rng):
    """One utterance of emotion label (an index), in the voice of sex; partner_label: the emotion of
    the partner's last utterance, None at the dialogue's start; said: the dialogue's replies so far"""
    coin = rng.random(2).tolist()  # filler?, reply?
    z = rng.standard_normal(4).tolist()  # noise of syllables, pitch, energy, tempo
    filler = coin[0] < FILLER
    text = pick(FILLERS if filler else TEMPLATES[label], rng).format(
        topic=pick(TOPICS, rng), thing=pick(THINGS, rng), person=pick(PEOPLE, rng), place=pick(PLACES, rng),
        time=pick(TIMES, rng))
    text = text[0].upper() + text[1:]
    reply = None
    if not filler and partner_label is not None and coin[1] < REPLY:
        reply = fresh(REPLIES[partner_label][label], said, rng)
    timbre, base_pitch = VOICES[sex]
    prosody = {
        "n_syllables": max(2, round(0.25 * len(text.split()) + 0.5 * z[0])),  # short clips keep the demo fast
        "pitch_hz": round(base_pitch * math.exp(PITCH_SHIFT[label] + PITCH_SD[label] * z[1]), 1),
        "energy": round(min(max(ENERGY[label] + 0.1 * z[2], 0.05), 1.0), 3),
        "tempo": round(min(max(TEMPO[label] + 0.06 * z[3], 0.6), 1.5), 3),
    }
    return {"text": f"{reply} {text}" if reply else text, "label": DEMO_LABELS[label], "prosody": prosody,
            "timbre": timbre}


def generate_dialogue(rng):
    cast = {pick(WOMEN, rng): "woman", pick(MEN, rng): "man"}
    names = list(cast)
    mood = draw(MOOD_ODDS, rng)
    state = {s: draw(EMOTION_ODDS[mood], rng) for s in names}  # each speaker's hidden emotion
    speaker, dialogue, said = pick(names, rng), [], set()
    for turn in range(int(rng.integers(8, 25))):
        if turn > 0 and rng.random() < ALTERNATE:
            speaker = next(s for s in names if s != speaker)
        if rng.random() < FLIP:
            mood = draw(MOOD_ODDS, rng)
        partner = next((u for u in reversed(dialogue) if u["speaker"] != speaker), None)  # the other's last
        partner_label = DEMO_LABELS.index(partner["label"]) if partner else None
        if rng.random() > PERSISTENCE:  # the emotion changes: caught from the partner, or the mood's
            catch = partner is not None and rng.random() < CONTAGION
            state[speaker] = partner_label if catch else draw(EMOTION_ODDS[mood], rng)
        u = utterance(cast[speaker], state[speaker], partner_label, said, rng)
        dialogue.append({"speaker": speaker, "sex": cast[speaker], **u})
    return dialogue


def generate_dialogues(n_dialogues, rng):
    """n_dialogues dialogues, each a list of utterance dicts in spoken order; rng: np.random.Generator."""
    return [generate_dialogue(rng) for _ in range(n_dialogues)]


def demo_vocab(dialogue_lists):
    """vocab.txt tokens: the specials, then every word the templates can produce (and any word in
    the dialogues of dialogue_lists, e.g. [train, dev, test]), so demo text never meets [UNK]."""
    texts = [re.sub(r"\{\w+\}", " ", t) for t in NEGATIVE + NEUTRAL + POSITIVE + FILLERS]
    texts += TOPICS + THINGS + PEOPLE + PLACES + TIMES + [r for row in REPLIES for cell in row for r in cell]
    texts += [u["text"] for dialogues in dialogue_lists for dialogue in dialogues for u in dialogue]
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", t.lower())}  # BERT's pre-tokenising
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


# -----------------------------------------------------------------------------
# the voices: a speech-like synthesiser: glottal pulses shaped by formant resonances (a source-filter model)

# formants F1..F3 of an adult male voice (Peterson & Barney, 1952) and a typical F4, which keeps
# some energy above F3; Hz
VOWELS = np.array([
    [730, 1090, 2440, 3500],  # a, "father"
    [530, 1840, 2480, 3500],  # e, "bed"
    [270, 2290, 3010, 3500],  # i, "beet"
    [570, 840, 2410, 3500],   # o, "bought"
    [300, 870, 2240, 3500],   # u, "boot"
], dtype=np.float64)
BANDWIDTHS = np.array([80.0, 100.0, 150.0, 250.0])  # Hz, of F1..F4


def glottal_flow(phase):
    # Rosenberg's glottal pulse, phase in [0, 1) of a pitch period: the vocal folds open over 40% of
    # the period, snap shut over 16%, and stay shut for the rest
    opening = 0.5 * (1 - np.cos(np.pi * phase / 0.4))
    closing = np.cos(np.pi * (phase - 0.4) / 0.32)
    return np.where(phase < 0.4, opening, np.where(phase < 0.56, closing, 0.0))


def formant_gain(freqs, formants):
    # magnitude response of a cascade of 2-pole resonators (as in Klatt's synthesiser): 1 at DC,
    # about F/B at each formant F, falling off above the last; freqs (K,), formants (4,) -> (K,)
    f = freqs[:, None]
    return np.prod(formants**2 / np.sqrt((formants**2 - f**2)**2 + (f * BANDWIDTHS)**2), axis=1)


def synthesize(n_syllables, pitch_hz, energy, tempo, timbre, rng):
    """
    A speech-like utterance of n_syllables voiced syllables and short pauses -> 16 kHz int16.
    pitch_hz: the mean fundamental; energy: loudness (the RMS is proportional to it); tempo: speed
    (1 = about 0.18 s per syllable); timbre: the speaker's vocal tract, one scaling per formant
    (F1, F2, F3; a shorter tuple repeats its last value; F4 follows F3). Deterministic given rng.
    """
    if not 1 <= len(timbre) <= 3:
        raise ValueError(f"timbre must hold 1 to 3 formant scalings, got {len(timbre)}")
    scale = np.array(list(timbre) + [timbre[-1]] * (4 - len(timbre)), dtype=np.float64)
    n = n_syllables
    # all prosody is drawn first, so that changing pitch_hz, energy or timbre changes nothing else
    durs = 0.18 / tempo * rng.uniform(0.75, 1.25, n)  # (n,) seconds
    # a pause after about 40% of syllables, as between words; within a word syllables run together
    gaps = rng.uniform(0.03, 0.12, n) * (rng.uniform(0, 1, n) < 0.4) / tempo  # (n,) seconds
    drift = rng.uniform(-0.25, 0.1)  # pitch change from first to last syllable: mostly falling
    f0 = pitch_hz * (1 + drift * (np.linspace(0, 1, n) - 0.5)) * rng.uniform(0.92, 1.08, n)  # (n,)
    glide = rng.uniform(-0.1, 0.1, n)  # pitch rise or fall within each syllable
    vowels = rng.integers(len(VOWELS), size=n)
    stress = rng.uniform(0.6, 1.0, n)
    phase0 = rng.uniform(0, 1, n)

    pieces = [np.zeros(int(0.05 * SAMPLE_RATE))]
    for i in range(n):
        m = int(durs[i] * SAMPLE_RATE)
        t = np.arange(m) / m  # (m,) position within the syllable, 0..1
        phase = phase0[i] + np.cumsum(f0[i] * (1 + glide[i] * (t - 0.5))) / SAMPLE_RATE
        flow = glottal_flow(phase % 1)
        envelope = np.sin(np.pi * t) ** 0.5  # the syllable's rise and fall
        voiced = np.diff(flow, prepend=flow[0])  # the lips radiate the flow's derivative
        voiced *= envelope / (voiced.std() + 1e-8)
        # breath noise, with a burst at the onset like a /t/ or /h/, so syllables start with a consonant
        breath = rng.standard_normal(m) * (0.05 * envelope + 0.8 * np.exp(-t * durs[i] / 0.012))
        # zero padding keeps the resonances' ringing from wrapping around; a power of 2 is fastest
        nfft = 1 << (m + 512).bit_length()
        spec = np.fft.rfft(voiced + breath, nfft)
        spec *= formant_gain(np.fft.rfftfreq(nfft, 1 / SAMPLE_RATE), VOWELS[vowels[i]] * scale)
        syllable = np.fft.irfft(spec, nfft)[:m]
        pieces.append(syllable * stress[i] / (np.sqrt(np.mean(syllable**2)) + 1e-8))
        pieces.append(np.zeros(int(gaps[i] * SAMPLE_RATE)))
    x = 0.1 * energy * np.concatenate(pieces)  # RMS of a syllable: 0.1 * energy * stress
    x += 0.0005 * rng.standard_normal(len(x))  # a quiet room
    return (x * 2**15).round().clip(-2**15, 2**15 - 1).astype(np.int16)


def synthesize_clip(prosody, timbre, seed):
    return synthesize(**prosody, timbre=timbre, rng=np.random.default_rng(seed))
