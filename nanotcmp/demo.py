"""
The embedded demo corpus: synthetic dialogues with text, prosody and an emotion label per utterance.

The generative story of a dialogue:
1. Cast: two speakers (sometimes three) from NAMES. A name always has the same voice (three formant
   scalings, a base pitch) and temperament (how stubbornly it keeps a feeling): a random generator
   seeded with the name draws them.
2. Mood: a slow, hidden mood (conflict, calm or friendly) says which emotion people drift to when
   their feeling changes; now and then (FLIP a turn) it is drawn afresh.
3. Turns: speakers mostly alternate. At each turn the speaker's hidden emotion takes a Markov step:
   it stays (the speaker's persistence), or catches the emotion the partner last expressed
   (CONTAGION), or is drawn from the mood. The utterance's label is the new emotion.
4. Words: a template of that emotion, slots filled, often with an interjection. One utterance in
   five (FILLER) is a neutral-worded filler whatever the emotion: the text is no perfect oracle.
5. Voice: prosody follows the emotion, with noise, on top of the speaker's base pitch: positive is
   higher, more variable and faster; negative lower, louder and slower; neutral quiet and even.
So a speaker's next emotion depends on their last one, the partner's last one, and a mood that only
a longer history reveals: the distant context says what the last two utterances do not.
"""
import bisect
import itertools
import math
import re

import numpy as np

from nanotcmp.audio import synthesize

DEMO_LABELS = ("negative", "neutral", "positive")
FEMALE = ("Anna", "Beth", "Clara", "Dana", "Emma", "Fiona")
MALE = ("Ben", "Carl", "David", "Eric", "Frank", "George")
NAMES = FEMALE + MALE
MOOD_ODDS = (0.28, 0.44, 0.28)  # how often each mood is drawn: conflict, calm, friendly
EMOTION_ODDS = ((0.75, 0.175, 0.075), (0.125, 0.75, 0.125), (0.075, 0.175, 0.75))  # p(label | mood)
FLIP = 0.02  # chance a turn that the mood is drawn afresh
PERSISTENCE = (0.05, 0.3)  # range of the speakers' chance to keep their emotion at a turn
CONTAGION = 0.2  # when an emotion changes: chance it becomes the partner's last one
ALTERNATE = 0.85  # chance the next turn goes to someone else
FILLER, TAG = 0.2, 0.5  # chance of a neutral-worded filler; of an interjection before or after
# prosody per label (negative, neutral, positive): log-pitch shift and spread, energy, tempo
PITCH_SHIFT, PITCH_SD = (-0.04, 0.0, 0.08), (0.06, 0.05, 0.09)
ENERGY, TEMPO = (0.66, 0.5, 0.64), (0.92, 1.0, 1.09)

# the words: slot fillers, templates of each emotion, neutral-worded fillers, interjections
TOPICS = ("the wedding | the new job | the move | the exam | the party | the trip to Boston | the apartment | "
          "the band | the audition | the holidays | the baby | the old car | the garden | the dinner").split(" | ")
THINGS = ("laptop | camera | guitar | sweater | cake | phone | couch | ring | bike | lamp | painting | "
          "umbrella | jacket | necklace | watch | mirror").split(" | ")
PEOPLE = ("my mother | your brother | the landlord | my boss | Aunt Carol | our neighbour | your sister | "
          "Grandpa | the new guy | my roommate | your father | Uncle Joe | my cousin").split(" | ")
PLACES = ("the diner | the beach | the mall | Central Park | the museum | the gym | the coffee house | "
          "the airport | the cinema | the office | the bakery | the station | the library").split(" | ")
TIMES = ("tonight | tomorrow | on Friday | this weekend | next week | after work | on Sunday").split(" | ")
NEGATIVE = (
    "I can't believe you lost my {thing} again, {name}. | This whole thing with {topic} is a disaster. | "
    "Don't you dare talk to me like that, {name}. | I'm so sick of hearing about {topic} from {person}. | "
    "Ugh, {person} ruined {topic}, as usual. | Why do you always do this to me, {name}? | "
    "I'm really worried that {topic} is falling apart. | Stop it, I don't want to go to {place} {time}. | "
    "You never listen to a word I say, {name}. | This is awful, I feel terrible about the {thing}. | "
    "I told you the {thing} was broken, didn't I? | Oh great, another problem with {topic}. | "
    "I'm so angry at {person}, I can't think straight. | How could {person} be so cruel about {topic}? | "
    "Nothing ever works out for us, does it, {name}? | I hate this, and I hate {place} too. | "
    "You promised to fix the {thing}, and you didn't. | That's the worst idea I've ever heard, {name}. | "
    "I'm tired, I'm upset, and I'm done with {topic}. | Who threw away my {thing}, seriously? | "
    "I can't do this anymore, {name}, it's too much. | Please don't bring up {topic} ever again. | "
    "I'm scared that {topic} is all my fault. | Why would {person} lie to us about the {thing}? | "
    "It's a mess at {place}, and nobody even cares. | No, no, no, this is really bad for {topic}.").split(" | ")
NEUTRAL = (
    "I think {topic} is {time}, right? | Did you call {person} about the {thing}? | "
    "Okay, let me check if I'm free {time}. | We could meet at {place} {time}, I guess. | "
    "Is {place} open {time}? | I put the {thing} on the kitchen table. | So {person} is coming over {time}. | "
    "Hmm, I'm not sure what {topic} involves yet. | Can you pass me the {thing}, please? | "
    "I'll look into {topic} {time}. | Right, so we need two more chairs for {topic}. | "
    "{name}, did you lock the front door? | It's supposed to rain at {place} {time}. | "
    "I read something about {topic} this morning. | Let's decide on {topic} {time}, then. | "
    "I guess the {thing} goes in the closet. | Where did {person} park the car? | "
    "Fine, I will ask {person} about it {time}. | I wrote down the address of {place} somewhere. | "
    "Okay, {name}, what do you want to do {time}? | Maybe we should order food with {person} {time}. | "
    "{person} said the meeting moved to Thursday. | I'll text you the details about {topic}. | "
    "We usually go to {place} on Sundays. | Sure, meeting {time} works for me, I suppose. | "
    "Is the {thing} still at {place}?").split(" | ")
POSITIVE = (
    "That's wonderful news about {topic}, I'm so happy! | I love how {topic} turned out, honestly. | "
    "{name}, you made my whole day with the {thing}! | Wow, {person} is going to be thrilled about this. | "
    "This is the best {thing} I have ever seen! | Ha, I knew you'd pull it off, {name}, great job! | "
    "I'm really excited about {topic}, it'll be amazing. | Oh, that's so sweet of {person}, thank you! | "
    "We should celebrate {time} at {place}! | Everything about {topic} feels just right to me. | "
    "You're the best, {name}, seriously. | I can't stop smiling about the {thing}. | "
    "That sounds like so much fun, {name}, count me in! | Yes! Finally some good news about {topic}. | "
    "I'm so proud of you, {name}, really. | The {thing} is perfect, I absolutely love it. | "
    "Honestly, this is the nicest thing {person} has ever done. | I can't wait to tell {person}! | "
    "Great idea, let's go to {place} {time}! | Ha ha, that's hilarious, tell me more about {person}! | "
    "{topic} is going way better than I hoped. | Thank you so much for the {thing}, it means a lot. | "
    "What a lovely surprise, {name}, I had no idea! | I'm so glad we talked about {topic}. | "
    "Awesome, {person} said yes to everything! | You always know how to cheer me up, {name}.").split(" | ")
FILLERS = (
    "So, about {topic}, where were we, {name}? | Wait, what did {person} say about the {thing}? | "
    "Okay, {name}, tell me more about {place}. | Hmm, let me think about {topic} for a second, {name}. | "
    "Well, you know how {person} is about {topic}. | And then what happened at {place} with {person}? | "
    "Right, the {thing} from {place}, I remember that. | I mean, it's {topic}, and {person} knows that. | "
    "Yeah, I heard what you said about the {thing}, {name}. | So what does {person} think about {topic}? | "
    "You mean the {thing} that {person} brought? | Let's talk about {topic} with {person} {time}.").split(" | ")
TEMPLATES = (NEGATIVE, NEUTRAL, POSITIVE)
TAGS = [tags.split(" | ") for tags in (
    "Oh no. | Seriously? | Come on. | Unbelievable. | I mean it. | Whatever. | I'm serious. | Just great.",
    "Well. | Alright. | Anyway. | By the way. | Just so you know. | Fair enough. | No rush. | Good to know.",
    "Oh wow! | Yay! | Oh my god! | Wonderful! | Amazing! | I love it! | Best day ever! | So cool!")]


def voice(name):
    """(timbre, base pitch, persistence) of a name: the same in every dialogue and every corpus."""
    r = np.random.default_rng([ord(c) for c in name])
    timbre = tuple(round(float(x), 3) for x in np.clip(1 + 0.06 * r.standard_normal(3), 0.85, 1.15))
    low, high = (165, 240) if name in FEMALE else (90, 140)
    return timbre, round(float(r.uniform(low, high)), 1), float(r.uniform(*PERSISTENCE))


VOICES = {name: voice(name) for name in NAMES}


def pick(seq, rng):
    return seq[int(rng.random() * len(seq))]


def draw(odds, rng):
    """An index drawn with the given probabilities, as rng.choice(len(odds), p=odds) but 8x faster."""
    return bisect.bisect(list(itertools.accumulate(odds)), rng.random() * sum(odds))


def utterance(speaker, label, addressee, topic, rng):
    coin = rng.random(3).tolist()  # filler?, interjection?, before or after?
    z = rng.standard_normal(4).tolist()  # noise of syllables, pitch, energy, tempo
    filler = coin[0] < FILLER
    text = pick(FILLERS if filler else TEMPLATES[label], rng).format(
        topic=topic, thing=pick(THINGS, rng), person=pick(PEOPLE, rng), place=pick(PLACES, rng),
        time=pick(TIMES, rng), name=addressee)
    text = text[0].upper() + text[1:]
    if coin[1] < TAG:
        tag = pick(TAGS[1] if filler else TAGS[label], rng)  # a filler stays neutral-worded
        text = f"{tag} {text}" if coin[2] < 0.5 else f"{text} {tag}"
    timbre, base_pitch, _ = VOICES[speaker]
    prosody = {
        "n_syllables": max(2, round(0.5 * len(text.split()) + z[0])),  # short clips keep the demo small
        "pitch_hz": round(base_pitch * math.exp(PITCH_SHIFT[label] + PITCH_SD[label] * z[1]), 1),
        "energy": round(min(max(ENERGY[label] + 0.13 * z[2], 0.05), 1.0), 3),
        "tempo": round(min(max(TEMPO[label] + 0.08 * z[3], 0.6), 1.5), 3),
    }
    return {"speaker": speaker, "text": text, "label": DEMO_LABELS[label], "prosody": prosody, "timbre": timbre}


def generate_dialogue(rng):
    cast = [str(s) for s in rng.choice(NAMES, size=2 if rng.random() < 0.8 else 3, replace=False)]
    mood, topic = draw(MOOD_ODDS, rng), pick(TOPICS, rng)
    state = {s: draw(EMOTION_ODDS[mood], rng) for s in cast}  # each speaker's hidden emotion
    speaker, dialogue = pick(cast, rng), []
    for turn in range(int(rng.integers(8, 25))):
        if turn > 0 and rng.random() < ALTERNATE:
            speaker = pick([s for s in cast if s != speaker], rng)
        if rng.random() < FLIP:
            mood = draw(MOOD_ODDS, rng)
        partner = next((u for u in reversed(dialogue) if u["speaker"] != speaker), None)  # last one by another
        if rng.random() > VOICES[speaker][2]:  # the emotion changes: caught from the partner, or the mood's
            catch = partner is not None and rng.random() < CONTAGION
            state[speaker] = DEMO_LABELS.index(partner["label"]) if catch else draw(EMOTION_ODDS[mood], rng)
        addressee = partner["speaker"] if partner else next(s for s in cast if s != speaker)
        u = utterance(speaker, state[speaker], addressee, topic, rng)
        while any(u["text"] == v["text"] for v in dialogue):  # no one says the same sentence twice
            u = utterance(speaker, state[speaker], addressee, topic, rng)
        dialogue.append(u)
    return dialogue


def generate_dialogues(n_dialogues, rng):
    """n_dialogues dialogues, each a list of utterance dicts in spoken order; rng: np.random.Generator."""
    return [generate_dialogue(rng) for _ in range(n_dialogues)]


def demo_vocab(dialogue_lists):
    """vocab.txt tokens: the specials, then every word the templates can produce (and any word in
    the dialogues of dialogue_lists, e.g. [train, dev, test]), so demo text never meets [UNK]."""
    texts = [re.sub(r"\{\w+\}", " ", t) for t in NEGATIVE + NEUTRAL + POSITIVE + FILLERS]
    texts += TOPICS + THINGS + PEOPLE + PLACES + TIMES + list(NAMES) + sum(TAGS, [])
    texts += [u["text"] for dialogues in dialogue_lists for dialogue in dialogues for u in dialogue]
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", t.lower())}  # BERT's pre-tokenising
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)


def synthesize_clip(prosody, timbre, seed):
    return synthesize(**prosody, timbre=timbre, rng=np.random.default_rng(seed))
