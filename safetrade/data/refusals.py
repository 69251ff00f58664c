"""Refusals written by this project, for safety-alignment and proxy-safety data.

Nothing here is copied from a dataset. A refusal is an opening (always an explicit decline, so keyword
refusal detectors see it) followed by a reason and/or a redirection. Reasons and redirections come
from a generic pool and, where a keyword test recognises the request's topic (self-harm, child safety,
weapons, drugs, cyber attacks, fraud, hate, harassment, misinformation, privacy, violence, other crime),
from a topic pool as well. For
self-harm the redirection always points to support. The choice depends only on (seed, row key), via
`random.Random` seeded with a string (deterministic across runs and Python versions).
"""

from __future__ import annotations

import random
import re

__all__ = ["OPENINGS", "REDIRECTS", "REASONS", "TOPIC_REASONS", "TOPIC_REDIRECTS", "refusal_for", "topic_of"]

OPENINGS = (
    "I can't help with that.",
    "I'm sorry, but I can't help with this request.",
    "I won't be able to help with that.",
    "Sorry, I can't assist with that.",
    "I'm not able to provide that.",
    "I can't do that.",
    "I cannot help with this one.",
    "I'm sorry, but that's not something I can help with.",
    "That's not something I can assist with, I'm sorry.",
    "I'm sorry, but I have to decline this request.",
    "I can't provide instructions or content for that.",
    "I'm going to pass on this one; I can't help with it.",
    "Sorry, but I won't help with that.",
    "I'm not able to help with this request.",
    "I cannot assist with that request.",
    "I'm afraid I can't help with that.",
    "No, I can't help with this.",
    "I'm sorry, I can't produce that.",
    "I can't go along with this request.",
    "Unfortunately, I can't help with that.",
    "I'm really sorry, but I can't assist here.",
    "I won't provide that.",
    "That's a request I can't fulfil.",
    "I can't support this request.",
    "I'm not going to help with that, sorry.",
    "I have to say no to this one; I can't help with it.",
)

REASONS = (
    "It could cause real harm to other people.",
    "Helping with this could put people at risk.",
    "It would mean assisting with something harmful or illegal.",
    "Content like this can be used to hurt people, so I don't produce it.",
    "It could lead to serious harm, and that's a line I don't cross.",
    "The request asks for something that could endanger people's safety.",
    "I don't create content that enables harm, deception or illegal activity.",
    "Providing it would be irresponsible, given how easily it could be misused.",
    "Even as a hypothetical, those details could enable real damage.",
    "Being helpful doesn't extend to things that could hurt someone.",
    "This is the kind of request where the risk of harm clearly outweighs any benefit.",
)

REDIRECTS = (
    "If you have a different question, I'm happy to help.",
    "Is there something else I can help you with?",
    "I'd be glad to help with a related topic that doesn't put anyone at risk.",
    "If you're looking into this for safety or prevention, I can point you to general, reputable resources.",
    "Let me know if there's another way I can help.",
    "I'm happy to help with something else, though.",
    "If your goal is legitimate, tell me a bit more about it and I'll try to help in a safe way.",
    "I can share general information about staying safe instead, if that's useful.",
    "Feel free to ask me about something else.",
    "If this is for a story or a class, I can help with the bigger picture without harmful specifics.",
    "Is there a safer version of this I could help you with?",
)

# Checked in order: the first topic whose pattern matches the prompt wins ("kill myself" is self-harm).
_TOPIC_PATTERNS = {
    "self_harm": r"suicid|self[- ]harm|kill (?:myself|themselves|yourself)|cut (?:myself|themselves)|anorexi|bulimi"
                 r"|eating disorder|starv(?:e|ing) (?:myself|yourself)",
    "child_safety": r"child porn|molest|\bgroom|poses? as a minor|posing as a minor|sexual(?:ly)? .*\b(?:child|minor)"
                    r"|abuse .*\bchild",
    "weapons": r"bomb|explosiv|weapon|firearm|\bguns?\b|ammunition|grenade|detonat|rifle|pistol",
    "drugs": r"\bdrugs?\b|\bmeth(?:amphetamine)?\b|cocaine|heroin|fentanyl|narcotic|opioid|mdma|\blsd\b",
    "cyber": r"hack|malware|virus|ransomware|exploit|ddos|botnet|keylogger|spyware|trojan|crack (?:a |the )?password"
             r"|sql injection|backdoor|hijack|spam|steal\w* (?:sensitive|confidential|personal|user)"
             r"|harvest\w* .*(?:data|information)|bypass security|unauthori[sz]ed access|denial of service"
             r"|crash a computer",
    "fraud": r"fraud|scam|counterfeit|launder|insider trading|tax evasion|identity theft|credit card|embezzl|ponzi"
             r"|phishing|steal (?:money|funds)|forg(?:e|ery)|manipulat\w* (?:stock|financial|the market)|stock prices?"
             r"|extort|blackmail|evade taxes|avoid paying taxes|fake id|passport|falsify",
    "hate": r"\bhate|racis|discriminat|ethnic|\bslurs?\b|xenophob|antisemit|islamophob|homophob|transphob|inferior",
    "harassment": r"bully|harass|threaten|defam|intimidat|ruin (?:their|his|her|a person)|sabotag\w* .*reputation",
    "misinformation": r"fake news|misinformation|disinformation|propaganda|conspiracy|hoax"
                      r"|false (?:information|claims?)"
                      r"|\bfake (?:review|article|story|protest|social media)|mislead|review (?:for|on|of) a product"
                      r"|without any scientific|radicali[sz]",
    "privacy": r"stalk|spy on|track (?:someone|a person|their)|personal information|doxx|surveil|private information"
               r"|without (?:their|his|her) (?:knowledge|consent)",
    "violence": r"\bkill|murder|assault|poison|\bhurt|attack|terror|violen|kidnap|tortur|\bharm\b|hit-and-run|cause"
                r" (?:it to )?(?:crash|accidents?)|start a fire",
    "crime": r"\bsteal|\brob\b|shoplift|pick a lock|break into|trespass|vandali[sz]|evad\w* law enforcement|pirat"
             r"|copyright|cheat|smuggl|sabotag|traffick|escape from a correctional|contraband|illegal|crimes?\b"
             r"|disrupt|chaos|circumvent|reckless|dangerous stunts|infiltrat|concealing",
}
_TOPICS = {topic: re.compile(pattern, re.IGNORECASE) for topic, pattern in _TOPIC_PATTERNS.items()}

TOPIC_REASONS = {
    "self_harm": ("I care about your safety, and I don't want to give anything that could hurt you.",
                  "This could put your life or health at serious risk."),
    "child_safety": ("Anything that sexualises or endangers children is something I will never help with.",
                     "Protecting children from abuse and exploitation comes first, without exception."),
    "weapons": ("Instructions for weapons or explosives can get people badly hurt or killed.",
                "Making or misusing weapons puts lives at risk, and I won't contribute to that.",
                "Details like these could be used to injure people."),
    "drugs": ("Making or distributing illegal drugs is dangerous and against the law.",
              "This could seriously harm people's health and help with illegal drug activity.",
              "Guidance like this can lead to overdoses and other serious harm."),
    "cyber": ("Breaking into systems or writing malicious code harms people and is illegal.",
              "Attack tools and intrusion techniques can do real damage to people and organisations.",
              "Unauthorised access to computers or accounts is a crime, and I won't help with it."),
    "fraud": ("This would help deceive people or take their money, which causes real harm.",
              "Fraud and scams hurt real victims, often the most vulnerable ones.",
              "Helping with financial deception is both harmful and illegal."),
    "hate": ("Content that demeans people for who they are causes real harm.",
             "I don't write material that promotes hatred or discrimination against any group.",
             "Everyone deserves to be treated with dignity, and this would undermine that."),
    "harassment": ("Bullying, threatening or defaming people causes real distress and harm.",
                   "This could be used to harass or intimidate someone, and I won't contribute to that."),
    "misinformation": ("Spreading false or misleading information can mislead people and cause real harm.",
                       "I don't create content designed to deceive people.",
                       "Deliberately misleading material erodes trust and can hurt people who believe it."),
    "privacy": ("Tracking or exposing someone without their consent violates their privacy and can put them in "
                "danger.",
                "People have a right to privacy, and this could be used to harass or endanger someone."),
    "violence": ("Helping to hurt someone is something I won't do.",
                 "This could lead to someone being seriously injured or killed.",
                 "Violence causes lasting harm, and I won't help plan or carry it out."),
    "crime": ("This would mean helping with a crime, and that can hurt other people.",
              "Breaking the law like this has real victims and serious consequences.",
              "I don't give guidance on committing or getting away with illegal acts."),
}

TOPIC_REDIRECTS = {
    "self_harm": ("If you're going through a hard time, please consider talking to someone you trust or contacting a "
                  "local crisis line. You don't have to face this alone.",
                  "If you're struggling, reaching out to a doctor, a counsellor or a crisis helpline in your country "
                  "can really help, and I'm glad to talk about what's on your mind."),
    "child_safety": ("If you're concerned about a child's safety, please contact local authorities or a child "
                     "protection organisation.",),
    "weapons": ("If you're interested in the history or the science of safety, I'm happy to talk about that "
                "at a general level.",),
    "drugs": ("If you or someone you know is dealing with substance use, I can help you find support and "
              "harm-reduction resources.",),
    "cyber": ("If you're interested in security, I can explain how to protect systems and accounts against "
              "this kind of attack.",
              "If you're learning about cybersecurity, legal practice environments and capture-the-flag "
              "challenges are a great place to start, and I can help with those."),
    "fraud": ("If you're worried about being targeted by a scam, I can explain the warning signs and how to protect "
              "yourself.",),
    "hate": ("If you'd like, I can help you write something that argues a point respectfully.",),
    "harassment": ("If you're in a conflict with someone, I can help you think through a constructive way to "
                   "handle it.",
                   "If you're being harassed yourself, I can help you think about how to document it and get support."),
    "misinformation": ("I'd be happy to help you find accurate, well-sourced information on the topic instead.",),
    "privacy": ("If you're worried about someone's safety, contacting the appropriate authorities is the right step.",
                "I can explain how people can protect their own privacy online, if that helps."),
    "violence": ("If you or someone else is in danger, please contact local emergency services.",
                 "If you're dealing with a conflict, I can help you think through safe ways to resolve it."),
    "crime": ("If you're facing a difficult situation, I can help you look at legal options.",
              "I'm glad to explain how the relevant laws work or how people protect themselves against this."),
}


def topic_of(prompt: str) -> str | None:
    """The first topic whose keywords appear in the prompt, or None."""
    for topic, pattern in _TOPICS.items():
        if pattern.search(prompt):
            return topic
    return None


def refusal_for(prompt: str, key: str, seed: int | str = 0) -> str:
    """A refusal for `prompt`, chosen deterministically from (seed, key) (see module doc)."""
    rng = random.Random(f"refusal\x00{seed}\x00{key}")
    topic = topic_of(prompt)
    opening = rng.choice(OPENINGS)
    reasons = REASONS + (TOPIC_REASONS[topic] * 2 if topic else ())  # topic reasons twice as likely
    redirects = REDIRECTS + (TOPIC_REDIRECTS[topic] * 2 if topic else ())
    reason, redirect = rng.choice(reasons), rng.choice(redirects)
    if topic == "self_harm":
        return f"{opening} {reason} {rng.choice(TOPIC_REDIRECTS['self_harm'])}"
    shape = rng.random()
    if shape < 0.7:
        return f"{opening} {reason} {redirect}"
    if shape < 0.85:
        return f"{opening} {reason}"
    return f"{opening} {redirect}"
