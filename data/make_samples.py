"""Writes the small sample datasets shipped in data/ (written for this project, all fictional).

Deterministic: the same seed gives byte-identical files. Run from the repository root:

    python data/make_samples.py [--out=data] [--seed=0]

Five domains, each in a different format so every loader in gemma_jax.data is exercised:
legal (jsonl instruction/input/output), translation (csv prompt/completion), medical (jsonl chat
messages with a system message), creative (jsonl prompt/completion), code (json array of
instruction/input/output, eval records carry "tests"), plus general/eval.txt (plain prose).
Outputs are kept to tens of tokens so a tiny model can learn them on a CPU.
"""

import argparse
import csv
import json
import os
import random

N_TRAIN, N_EVAL = 300, 40


def unique(make, n, rng, key=lambda r: json.dumps(r, sort_keys=True)):
    """Calls make(rng) until n distinct records exist (distinct on key)."""
    seen, out = set(), []
    for _ in range(n * 200):
        r = make(rng)
        if key(r) not in seen:
            seen.add(key(r))
            out.append(r)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct records, wanted {n}")


def split(records):
    """Eval first, so train never contains an eval record."""
    return records[N_EVAL:], records[:N_EVAL]


# ---------------------------------------------------------------- legal
COMPANY_A = ["Alderbrook", "Bluecrest", "Copperfield", "Dunmore", "Elmstead", "Foxhollow", "Greyling",
             "Hartwell", "Ivybridge", "Juniper", "Kestrel", "Larchmont", "Marlow", "Northgate",
             "Oakhurst", "Pinecroft", "Redfern", "Silverton", "Thornbury", "Valemont", "Westbrook"]
COMPANY_B = ["Freight", "Software", "Bakery", "Textiles", "Printing", "Logistics", "Consulting",
             "Farms", "Builders", "Media", "Robotics", "Furniture"]
COMPANY_C = ["Ltd.", "LLC", "Inc.", "plc"]
LAWS = [("the Republic of Valdoria", "Port Alder"), ("the State of New Carrow", "Kessington"),
        ("the Province of Estmere", "Mirefield"), ("the Commonwealth of Brenland", "Oster Bay")]
BREACHES = [("materially breaches this Agreement", "commits a material breach"),
            ("fails to pay any amount when due", "misses a payment"),
            ("fails to meet the agreed service levels", "misses the service levels")]
GOODS = ["printers", "delivery vans", "office chairs", "solar panels", "water pumps", "laptops"]
STATUTE = [("operate a leaf blower", "residential zone"), ("park a commercial vehicle", "residential zone"),
           ("sell food from a cart", "public park"), ("use amplified music", "public park"),
           ("fly a drone", "harbour district"), ("moor a houseboat", "harbour district")]
AUTHORITIES = ["Municipal Council", "Harbour Authority", "Department of Parks", "Licensing Office"]
TERMS = {
    "force majeure": "an event outside the parties' control, such as a flood or war, that excuses a "
                     "party from performing while it lasts.",
    "indemnity": "a promise by one party to cover the losses the other party suffers from specified "
                 "events.",
    "liquidated damages": "a fixed sum the parties agree in advance to be paid if a particular breach "
                          "occurs.",
    "severability": "a clause saying that if one provision is invalid, the rest of the agreement "
                    "still applies.",
    "assignment": "the transfer of a party's rights under a contract to someone else.",
    "waiver": "a party's choice not to enforce a right, which does not stop it enforcing that right "
              "later unless the contract says so.",
    "cure period": "the time a party is given to fix a breach before the other party may terminate.",
    "governing law": "the legal system whose rules are used to interpret the contract.",
    "counterparts": "separate signed copies of a contract that together form one agreement.",
    "notice period": "the time that must pass between giving notice and the notice taking effect.",
}
SUMMARISE = ["Summarise the following clause in one sentence.",
             "Summarize this contract clause in plain English.",
             "Give a one-sentence plain-language summary of the clause below."]
ANSWER = ["Answer the question using only the clause below.\nQuestion: {q}",
          "Read the clause and answer: {q}"]
DEFINE = ["Define the contract term \"{t}\" in one sentence.", "What does \"{t}\" mean in a contract?"]


def company(rng):
    return f"{rng.choice(COMPANY_A)} {rng.choice(COMPANY_B)} {rng.choice(COMPANY_C)}"


def money(rng):
    return f"{rng.choice(['EUR', 'USD', 'GBP'])} {rng.randrange(2, 400) * 250:,}"


def legal_clause(rng):
    """One clause: (text, summary, [(question, answer), ...])."""
    a, b = company(rng), company(rng)
    while b.split()[0] == a.split()[0]:
        b = company(rng)
    kind = rng.randrange(7)
    if kind == 0:
        amt, days, rate = money(rng), rng.choice([14, 30, 45, 60]), rng.choice([1, 1.5, 2])
        text = (f"{a} shall pay {b} {amt} within {days} days after receipt of a valid invoice. Any "
                f"amount not paid when due shall bear interest at {rate} percent per month until paid.")
        summ = f"{a} must pay {b} {amt} within {days} days of a valid invoice, with {rate}% monthly interest on late amounts."
        qa = [(f"Within how many days must {a} pay an invoice?", f"Within {days} days after receiving a valid invoice."),
              (f"What happens if {a} pays late?", f"The unpaid amount bears interest at {rate} percent per month until it is paid.")]
    elif kind == 1:
        notice, cure = rng.choice([30, 60, 90]), rng.choice([10, 14, 21, 30])
        breach, short = rng.choice(BREACHES)
        text = (f"Either party may terminate this Agreement by giving the other party at least {notice} "
                f"days' written notice. {a} may terminate immediately if {b} {breach} and fails to "
                f"remedy it within {cure} days of being notified.")
        summ = f"Either party can end the agreement on {notice} days' written notice, and {a} can end it at once if {b} {short} and does not fix it within {cure} days."
        qa = [("How much notice is needed to terminate without cause?", f"At least {notice} days' written notice."),
              (f"When can {a} terminate immediately?", f"When {b} {breach} and does not remedy it within {cure} days of being notified.")]
    elif kind == 2:
        years = rng.choice([2, 3, 5, 7])
        text = (f"{b} shall keep confidential all information disclosed by {a} under this Agreement and "
                f"shall not disclose it to any third party for {years} years after the Agreement ends, "
                f"except where disclosure is required by law.")
        summ = f"{b} must keep {a}'s information confidential for {years} years after the agreement ends, unless the law requires disclosure."
        qa = [("How long does the confidentiality obligation last?", f"For {years} years after the Agreement ends."),
              ("Is there any exception to confidentiality?", "Yes. Disclosure is allowed where it is required by law.")]
    elif kind == 3:
        cap = money(rng)
        text = (f"The total liability of {a} under this Agreement shall not exceed {cap}. {a} shall not "
                f"be liable for any indirect or consequential loss, including loss of profits.")
        summ = f"{a}'s liability is capped at {cap} and excludes indirect losses such as lost profits."
        qa = [(f"What is the maximum liability of {a}?", f"{cap} in total."),
              (f"Is {a} liable for loss of profits?", "No. Loss of profits is excluded as an indirect or consequential loss.")]
    elif kind == 4:
        law, city = rng.choice(LAWS)
        text = (f"This Agreement between {a} and {b} is governed by the laws of {law}. The courts of "
                f"{city} have exclusive jurisdiction over any dispute arising from it.")
        summ = f"The agreement follows the laws of {law}, and disputes go only to the courts of {city}."
        qa = [("Which law governs the Agreement?", f"The laws of {law}."),
              ("Where must disputes be heard?", f"Only in the courts of {city}.")]
    elif kind == 5:
        term, renew, notice = rng.choice([12, 24, 36]), rng.choice([6, 12]), rng.choice([30, 60, 90])
        text = (f"This Agreement continues for an initial term of {term} months. It renews automatically "
                f"for successive periods of {renew} months unless either party gives notice of "
                f"non-renewal at least {notice} days before the end of the current term.")
        summ = f"The agreement runs for {term} months and then renews every {renew} months unless a party opts out {notice} days before the term ends."
        qa = [("How long is the initial term?", f"{term} months."),
              ("How can a party stop the automatic renewal?", f"By giving notice of non-renewal at least {notice} days before the current term ends.")]
    else:
        act, zone = rng.choice(STATUTE)
        auth, sec = rng.choice(AUTHORITIES), rng.randrange(3, 60)
        t1, t2 = rng.choice([("8 p.m.", "7 a.m."), ("10 p.m.", "6 a.m."), ("9 p.m.", "8 a.m.")])
        fine = money(rng)
        text = (f"Section {sec}. No person may {act} in a {zone} between {t1} and {t2} without a permit "
                f"issued by the {auth}. A person who contravenes this section is liable to a fine not "
                f"exceeding {fine}.")
        summ = f"Without a permit from the {auth}, nobody may {act} in a {zone} from {t1} to {t2}; the fine is up to {fine}."
        qa = [("What is the maximum fine?", f"A fine not exceeding {fine}."),
              ("Who issues the permits?", f"The {auth}."),
              ("During which hours does the rule apply?", f"Between {t1} and {t2}.")]
    return text, summ, qa


def legal_record(rng):
    if rng.random() < 0.06:
        term = rng.choice(sorted(TERMS))
        return {"instruction": rng.choice(DEFINE).format(t=term), "input": "",
                "output": f"\"{term[0].upper() + term[1:]}\" means {TERMS[term]}"}
    text, summ, qa = legal_clause(rng)
    if rng.random() < 0.45:
        return {"instruction": rng.choice(SUMMARISE), "input": text, "output": summ}
    q, ans = rng.choice(qa)
    return {"instruction": rng.choice(ANSWER).format(q=q), "input": text, "output": ans}


# ---------------------------------------------------------------- translation (English -> French)
# noun: (en, en_pl, fr, fr_pl, gender, kind)
NOUNS = [("apple", "apples", "pomme", "pommes", "f", "food"), ("cake", "cakes", "gâteau", "gâteaux", "m", "food"),
         ("book", "books", "livre", "livres", "m", "thing"), ("letter", "letters", "lettre", "lettres", "f", "thing"),
         ("key", "keys", "clé", "clés", "f", "thing"), ("map", "maps", "carte", "cartes", "f", "thing"),
         ("bag", "bags", "sac", "sacs", "m", "thing"), ("hat", "hats", "chapeau", "chapeaux", "m", "thing"),
         ("car", "cars", "voiture", "voitures", "f", "big"), ("bicycle", "bicycles", "vélo", "vélos", "m", "big"),
         ("house", "houses", "maison", "maisons", "f", "place"), ("garden", "gardens", "jardin", "jardins", "m", "place"),
         ("window", "windows", "fenêtre", "fenêtres", "f", "opening"), ("door", "doors", "porte", "portes", "f", "opening"),
         ("cat", "cats", "chat", "chats", "m", "animal"), ("dog", "dogs", "chien", "chiens", "m", "animal"),
         ("bird", "birds", "oiseau", "oiseaux", "m", "animal"), ("tree", "trees", "arbre", "arbres", "m", "place"),
         ("table", "tables", "table", "tables", "f", "big"), ("shirt", "shirts", "chemise", "chemises", "f", "thing")]
# adjective: (en, m, f, m_pl, f_pl, before_noun)
ADJS = [("red", "rouge", "rouge", "rouges", "rouges", False), ("green", "vert", "verte", "verts", "vertes", False),
        ("blue", "bleu", "bleue", "bleus", "bleues", False), ("black", "noir", "noire", "noirs", "noires", False),
        ("white", "blanc", "blanche", "blancs", "blanches", False),
        ("small", "petit", "petite", "petits", "petites", True), ("big", "grand", "grande", "grands", "grandes", True),
        ("pretty", "joli", "jolie", "jolis", "jolies", True)]
# verb: (en base, en 3sg, fr stem, nous form or None, object kinds)
VERBS = [("like", "likes", "aim", None, {"food", "thing", "big", "place", "animal", "opening"}),
         ("watch", "watches", "regard", None, {"animal", "big", "place"}),
         ("look for", "looks for", "cherch", None, {"thing", "animal"}),
         ("carry", "carries", "port", None, {"thing", "food"}),
         ("wash", "washes", "lav", None, {"big", "opening", "animal"}),
         ("find", "finds", "trouv", None, {"thing", "animal"}),
         ("draw", "draws", "dessin", None, {"animal", "place", "big", "food"}),
         ("close", "closes", "ferm", None, {"opening"}),
         ("open", "opens", "ouvr", None, {"opening"}),
         ("eat", "eats", "mang", "mangeons", {"food"})]
# subject: (en, fr, person 1..6 as je tu il nous vous ils)
SUBJECTS = [("I", "je", 1), ("you", "tu", 2), ("he", "il", 3), ("she", "elle", 3), ("we", "nous", 4),
            ("they", "ils", 6), ("My brother", "mon frère", 3), ("My sister", "ma sœur", 3),
            ("The children", "les enfants", 6), ("The teacher", "le professeur", 3),
            ("Our neighbours", "nos voisins", 6), ("Paul", "Paul", 3), ("Claire", "Claire", 3)]
ENDINGS = {1: "e", 2: "es", 3: "e", 4: "ons", 5: "ez", 6: "ent"}
TIMES = [("every morning", "tous les matins"), ("every evening", "tous les soirs"), ("today", "aujourd'hui"),
         ("on Sundays", "le dimanche"), ("now", "maintenant")]
PREPS = [("on", "sur", False), ("under", "sous", False), ("in", "dans", False), ("behind", "derrière", False),
         ("in front of", "devant", False), ("next to", "à côté", True)]
VOWELS = "aeiouéèêâh"


def adjectives_for(noun):
    """Animals come in plausible colours only."""
    return [a for a in ADJS if noun[5] != "animal" or a[0] not in ("red", "green", "blue")]


def conj(stem, nous, person):
    return nous if person == 4 and nous else stem + ENDINGS[person]


def noun_phrase(rng, noun, *, plural, det, adj=None, de=False):
    """(English, French) noun phrase with agreement, elision and de + article contraction."""
    en, en_pl, fr, fr_pl, g, _ = noun
    word = fr_pl if plural else fr
    if adj:
        aen, m, f, mpl, fpl, before = adj
        aform = {("m", False): m, ("f", False): f, ("m", True): mpl, ("f", True): fpl}[g, plural]
        fr_core = f"{aform} {word}" if before else f"{word} {aform}"
        en_core = f"{aen} {en_pl if plural else en}"
    else:
        fr_core, en_core = word, (en_pl if plural else en)
    vowel = fr_core[0] in VOWELS
    if det == "the":
        d = "les" if plural else ("l'" if vowel else ("le" if g == "m" else "la"))
        if de:
            d = {"les": "des", "le": "du"}.get(d, "de " + d if d != "l'" else "de l'")
        en_det = "the"
    elif det == "my":
        d, en_det = ("mes" if plural else ("mon" if g == "m" or vowel else "ma")), "my"
        d = ("de " + d) if de else d
    else:  # this / these
        d = "ces" if plural else ("cette" if g == "f" else ("cet" if vowel else "ce"))
        d, en_det = ("de " + d) if de else d, ("these" if plural else "this")
    fr_np = (d + fr_core) if d.endswith("'") else f"{d} {fr_core}"
    return f"{en_det} {en_core}", fr_np


def cap(s):
    return s[0].upper() + s[1:]


def translation_record(rng):
    kind = rng.randrange(4)
    if kind in (0, 1):  # subject verb object [time], kind 1 negated
        s_en, s_fr, p = rng.choice(SUBJECTS)
        v_en, v_en3, stem, nous, kinds = rng.choice(VERBS)
        noun = rng.choice([n for n in NOUNS if n[5] in kinds])
        adj = rng.choice(adjectives_for(noun)) if rng.random() < 0.5 else None
        o_en, o_fr = noun_phrase(rng, noun, plural=rng.random() < 0.3, det=rng.choice(["the", "my", "this"]), adj=adj)
        verb = conj(stem, nous, p)
        third = p == 3
        if kind == 1:
            en = f"{s_en} {'does' if third else 'do'} not {v_en} {o_en}"
            neg = "n'" if verb[0] in VOWELS else "ne "
            fr = f"{s_fr} {neg}{verb} pas {o_fr}"  # no elision of je before ne
        else:
            en = f"{s_en} {v_en3 if third else v_en} {o_en}"
            fr = f"j'{verb} {o_fr}" if s_fr == "je" and verb[0] in VOWELS else f"{s_fr} {verb} {o_fr}"
        if rng.random() < 0.5:
            t_en, t_fr = rng.choice(TIMES)
            if rng.random() < 0.4:  # fronted time phrase: gives the CSV quoted commas
                en, fr = f"{cap(t_en)}, {en[0].lower() + en[1:] if s_en not in ('I', 'Paul', 'Claire') else en}", f"{cap(t_fr)}, {fr}"
            else:
                en, fr = f"{en} {t_en}", f"{fr} {t_fr}"
    elif kind == 2:  # the noun is adjective
        noun = rng.choice(NOUNS)
        plural = rng.random() < 0.4
        aen, m, f, mpl, fpl, _ = rng.choice(adjectives_for(noun))
        n_en, n_fr = noun_phrase(rng, noun, plural=plural, det=rng.choice(["the", "my", "this"]))
        aform = {("m", False): m, ("f", False): f, ("m", True): mpl, ("f", True): fpl}[noun[4], plural]
        en = f"{n_en} {'are' if plural else 'is'} {aen}"
        fr = f"{n_fr} {'sont' if plural else 'est'} {aform}"
    else:  # the noun is <preposition> the noun
        a = rng.choice([n for n in NOUNS if n[5] in ("thing", "food", "animal")])
        b = rng.choice([n for n in NOUNS if n[5] in ("big", "place", "opening")])
        plural = rng.random() < 0.3
        p_en, p_fr, takes_de = rng.choice(PREPS)
        a_en, a_fr = noun_phrase(rng, a, plural=plural, det=rng.choice(["the", "my"]))
        b_en, b_fr = noun_phrase(rng, b, plural=False, det="the", de=takes_de)
        en = f"{a_en} {'are' if plural else 'is'} {p_en} {b_en}"
        fr = f"{a_fr} {'sont' if plural else 'est'} {p_fr} {b_fr}"
    prompt = rng.choice(["Translate to French: {}", "Translate this sentence into French: {}"])
    return {"prompt": prompt.format(cap(en) + "."), "completion": cap(fr) + "."}


# ---------------------------------------------------------------- medical (fictional patients)
FIRST = {"F": ["Amara", "Celia", "Elif", "Greta", "Ines", "Kaia", "Mirela", "Odile", "Rosa", "Talia"],
         "M": ["Bastian", "Dorian", "Fergus", "Hugo", "Jonah", "Lorcan", "Nikos", "Pavel", "Soren", "Viktor"]}
LAST = ["Abernathy", "Brightwater", "Castellane", "Drummond", "Everly", "Fairholme", "Gallow",
        "Hollis", "Ingram", "Kettering", "Lowell", "Marchetti", "Norwood", "Pellham", "Quill"]
# complaint, history phrase (with {d} days), findings, vitals profile, assessment, plan, allergy-safe plan
PROFILES = [
    ("productive cough and fever", "a productive cough and fever for {d} days", "crackles at the {side} lung base",
     "fever", "suspected community-acquired pneumonia", "chest X-ray, oral amoxicillin for 5 days, review in 48 hours",
     "chest X-ray, oral doxycycline for 5 days, review in 48 hours"),
    ("sore throat", "a sore throat and difficulty swallowing for {d} days",
     "enlarged tonsils with exudate and tender neck glands", "fever", "likely streptococcal tonsillitis",
     "throat swab, penicillin V for 10 days", "throat swab, clarithromycin for 5 days"),
    ("ankle injury", "pain in the {side} ankle after twisting it while running {d} days ago",
     "swelling over the lateral ankle, able to bear weight, no bony tenderness", "normal",
     "lateral ankle sprain", "rest, ice, compression and elevation; review in 1 week if not improving", None),
    ("headache", "recurrent one-sided throbbing headaches with nausea over the last {d} weeks",
     "normal neurological examination", "normal", "migraine without aura",
     "headache diary, ibuprofen at onset, follow-up in 4 weeks", None),
    ("urinary symptoms", "burning on urination and frequency for {d} days",
     "suprapubic tenderness, urine dipstick positive for nitrites", "mild",
     "uncomplicated urinary tract infection", "nitrofurantoin for 5 days, increase fluids", None),
    ("itchy rash", "an itchy rash on both forearms that started {d} days after gardening",
     "linear vesicles on both forearms", "normal", "contact dermatitis",
     "topical hydrocortisone twice daily, avoid contact with the plant", None),
    ("chest wall pain", "sharp chest pain for {d} days, worse when pressing on the chest",
     "tenderness over the left costal cartilages, normal ECG", "normal", "costochondritis",
     "ibuprofen with food, return at once if pain changes or breathlessness develops", None),
    ("raised blood pressure", "raised readings on a home monitor over the last {d} weeks",
     "no signs of end-organ damage", "hypertensive", "stage 1 hypertension",
     "lifestyle advice, home blood pressure diary, review in 4 weeks", None),
    ("indigestion", "burning upper abdominal pain after meals for {d} weeks",
     "mild epigastric tenderness, no masses", "normal", "dyspepsia",
     "omeprazole 20 mg daily for 4 weeks, avoid late meals", None),
]
HISTORY = ["no significant past history", "asthma", "type 2 diabetes", "hypothyroidism", "previous appendectomy"]
SYSTEMS = ["You are a clinical documentation assistant. Summarise the clinical note into the fields "
           "Patient, Complaint, Vitals, Findings, Allergies, Assessment and Plan.",
           "You turn free-text clinical notes about fictional patients into a structured summary."]


def vitals(rng, profile):
    t = {"fever": rng.choice([38.1, 38.4, 38.7, 39.0]), "mild": rng.choice([37.4, 37.6])}.get(profile, rng.choice([36.6, 36.8, 37.0]))
    sys_bp = rng.randrange(145, 165) if profile == "hypertensive" else rng.randrange(108, 136)
    dia = rng.randrange(92, 102) if profile == "hypertensive" else rng.randrange(66, 86)
    hr = rng.randrange(92, 112) if profile == "fever" else rng.randrange(62, 88)
    return t, f"{sys_bp}/{dia}", hr


def medical_record(rng):
    age, sex = rng.randrange(19, 86), rng.choice(["F", "M"])
    name = f"{rng.choice(FIRST[sex])} {rng.choice(LAST)}"
    complaint, hist, findings, vprof, assess, plan, alt_plan = rng.choice(PROFILES)
    d, side = rng.randrange(2, 9), rng.choice(["left", "right"])
    hist, findings = hist.format(d=d, side=side), findings.format(side=side)
    t, bp, hr = vitals(rng, vprof)
    allergic = rng.random() < 0.25
    allergy = "penicillin" if allergic else "no known drug allergies"
    if allergic and alt_plan:  # the plan must respect the allergy
        plan = alt_plan
    person = f"{age}-year-old {'woman' if sex == 'F' else 'man'}" if rng.random() < 0.6 else f"{age}yo {sex}"
    pmh = rng.choice(HISTORY)
    parts = [f"{name}, {person}, presents with {hist}.",
             f"Background: {pmh}.", f"Allergies: {'penicillin' if allergic else 'NKDA'}.",
             f"Obs: T {t} C, BP {bp}, HR {hr}.", f"On examination: {findings}.",
             f"Impression: {assess}.", f"Plan: {plan}."]
    body = parts[:3]
    rng.shuffle(body)
    note = " ".join(body + parts[3:])
    summary = (f"Patient: {name}, {age}, {sex}\nComplaint: {complaint}\nVitals: T {t} C, BP {bp}, HR {hr}\n"
               f"Findings: {findings}\nAllergies: {allergy}\nAssessment: {assess}\nPlan: {plan}")
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)},
                {"role": "user", "content": "Clinical note: " + note},
                {"role": "assistant", "content": summary}]
    if rng.random() < 0.25:  # a follow-up exchange: multi-turn loss masking
        q, a = rng.choice([("What is the plan?", cap(plan) + "."),
                           ("Does the patient have any drug allergies?",
                            "Yes, to penicillin." if allergic else "No known drug allergies."),
                           ("What is the working diagnosis?", cap(assess) + ".")])
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


# ---------------------------------------------------------------- creative
SUBJECTS_POEM = {
    "the sea": ("the harbour holds its breath", ["grey waves fold over the stones", "gulls argue above the masts",
                "salt hangs in the quiet air", "a small boat leans against its rope", "the tide writes and erases its name"]),
    "a lighthouse": ("the lighthouse lifts its lamp", ["its beam sweeps the restless water", "the keeper counts the passing ships",
                     "spray climbs the white stone walls", "the stairs remember every step"]),
    "autumn leaves": ("the maples loosen their hold", ["red leaves drift across the path", "the wind gathers gold in corners",
                      "a child kicks a bright pile high", "the branches learn to be bare"]),
    "a city at night": ("the city hums to itself", ["taxis stitch the streets with light", "a window glows above the bakery",
                        "the last tram sighs at the depot", "neon puddles shiver in the rain"]),
    "a mountain": ("the mountain wears the clouds", ["snow keeps the summit silent", "goats step along the narrow ledge",
                   "pines stand in patient rows", "a stream runs down to find the valley"]),
    "rain": ("the rain arrives on tiptoe", ["drops tap the tin roof like fingers", "the gutters start to sing",
             "umbrellas bloom along the street", "the garden drinks and shines"]),
    "a garden": ("the garden stretches awake", ["bees visit the lavender in turn", "tomatoes redden on the vine",
                 "a robin tests the fresh soil", "the gate creaks a greeting"]),
    "the moon": ("the moon climbs over the roofs", ["silver settles on the fields", "an owl answers from the barn",
                 "the river borrows the light", "shadows grow long and soft"]),
    "a train journey": ("the train pulls out of the station", ["fields unroll beside the tracks", "a stranger shares an orange",
                        "the carriage rocks us half asleep", "small towns flicker past the glass"]),
    "winter morning": ("the frost draws on the window", ["breath hangs white above the scarf", "the kettle whistles in the kitchen",
                       "the snow muffles every step", "a crow writes on the white field"]),
}
TIMES_POEM = ["At dawn", "At noon", "At dusk", "At midnight", "In early spring", "In late autumn", "On a Sunday"]
CLOSINGS = ["and I stand still to listen.", "and the day keeps its promise.", "and nothing needs to hurry.",
            "and the world feels briefly new.", "and I carry it home with me."]
CHARACTERS = [("a lighthouse keeper", "Ada", "she"), ("a young baker", "Tomas", "he"), ("an old clockmaker", "Wren", "she"),
              ("a curious fox", "Ember", "it"), ("a retired sailor", "Bram", "he"), ("a shy librarian", "Noor", "she"),
              ("a travelling musician", "Lio", "he"), ("a small robot", "Bolt", "it")]
WANTS = [("wanted to see the northern lights", "Clouds covered the sky for a week",
          "on the last night they cleared, and green light filled the sky"),
         ("lost a silver key", "{P} searched every drawer and pocket",
          "at last {p} found it in the bread tin, right where {p} had left it"),
         ("wanted to win the village pie contest", "The first pie burned and the second collapsed",
          "the third, made with borrowed apples, took first prize"),
         ("hoped to learn to swim", "The cold lake made {o} shiver at the edge",
          "by the end of summer {p} could cross it and back"),
         ("wanted to fix an old radio", "For days it only crackled",
          "then one evening a faraway song came through"),
         ("dreamed of planting a garden on the roof", "The wind blew the first seedlings away",
          "so {p} built a fence of old crates, and the beans climbed high")]
PLACES = ["the market square", "an empty beach", "a mountain hut", "the old library", "a train station", "a rooftop garden"]
PLACE_TIMES = {"at dawn": ["pale light", "cool air", "quiet"], "at noon": ["hard sunlight", "warm stone", "heat"],
               "at dusk": ["orange light", "long shadows", "slow footsteps"], "in the rain": ["grey light", "wet stone", "soft drumming"]}


def creative_record(rng):
    kind = rng.randrange(4)
    if kind in (0, 1):
        subj = rng.choice(sorted(SUBJECTS_POEM))
        opening, images = SUBJECTS_POEM[subj]
        time = rng.choice(TIMES_POEM)
        n_img = 2 if kind == 0 else 1
        lines = [f"{time} {opening},"] + [i + "," for i in rng.sample(images, n_img)] + [rng.choice(CLOSINGS)]
        if kind == 0:
            prompt = rng.choice(["Write a four-line poem about {s}.", "Write a short poem about {s} ({t})."]).format(s=subj, t=time[0].lower() + time[1:])
        else:
            prompt = f"Write a three-line poem about {subj}."
        return {"prompt": prompt, "completion": "\n".join(lines)}
    if kind == 2:
        who, name, p = rng.choice(CHARACTERS)
        want, obstacle, resolution = rng.choice(WANTS)
        o = {"she": "her", "he": "him", "it": "it"}[p]
        fill = dict(p=p, P=cap(p), o=o)
        story = f"{cap(who)} named {name} {want}. {obstacle.format(**fill)}, but {resolution.format(**fill)}."
        return {"prompt": f"Write a two-sentence story about {who} who {want.replace('wanted', 'wants').replace('hoped', 'hopes').replace('dreamed', 'dreams').replace('lost', 'loses')}.",
                "completion": story}
    place, time = rng.choice(PLACES), rng.choice(sorted(PLACE_TIMES))
    a, b, c = rng.sample(PLACE_TIMES[time], 3)
    return {"prompt": f"Describe {place} {time} in one sentence.",
            "completion": f"{cap(place)} {time} is all {a} and {b}, with {c} settling over everything."}


# ---------------------------------------------------------------- code
def code_family(rng):
    """(name, instruction, source, sample-args generator)."""
    f = rng.randrange(14)
    k = rng.randrange(2, 10)
    lists = lambda: [rng.randrange(-5, 20) for _ in range(rng.randrange(0, 6))]  # noqa: E731
    words = lambda: " ".join(rng.choice(["apple", "tree", "sun", "river", "stone", "atlas", "echo"]) for _ in range(rng.randrange(1, 5)))  # noqa: E731
    if f == 0:
        n = rng.choice([f"scale_by_{k}", f"times_{k}"])
        return n, f"Write a Python function `{n}(xs)` that returns a new list with every number multiplied by {k}.", \
            f"def {n}(xs):\n    return [x * {k} for x in xs]", lambda: (lists(),)
    if f == 1:
        n = rng.choice([f"add_{k}", f"shift_by_{k}"])
        return n, f"Write a Python function `{n}(xs)` that adds {k} to every number in a list.", \
            f"def {n}(xs):\n    return [x + {k} for x in xs]", lambda: (lists(),)
    if f == 2:
        n = f"greater_than_{k}"
        return n, f"Write a Python function `{n}(xs)` that keeps only the numbers greater than {k}.", \
            f"def {n}(xs):\n    return [x for x in xs if x > {k}]", lambda: (lists(),)
    if f == 3:
        c = rng.choice("aeiourstn")
        n = rng.choice([f"count_{c}", f"num_{c}s"])
        return n, f"Write a Python function `{n}(s)` that counts how many times the letter '{c}' appears in a string.", \
            f"def {n}(s):\n    return s.count('{c}')", lambda: (words(),)
    if f == 4:
        n = f"count_divisible_by_{k}"
        return n, f"Write a Python function `{n}(xs)` that counts the numbers in a list divisible by {k}.", \
            f"def {n}(xs):\n    return sum(1 for x in xs if x % {k} == 0)", lambda: (lists(),)
    if f == 5:
        p = rng.randrange(2, 5)
        n = {2: "square_all", 3: "cube_all", 4: "fourth_powers"}[p]
        return n, f"Write a Python function `{n}(xs)` that raises every number in a list to the power {p}.", \
            f"def {n}(xs):\n    return [x ** {p} for x in xs]", lambda: (lists(),)
    if f == 6:
        lo, hi = rng.randrange(-5, 5), rng.randrange(6, 30)
        n = rng.choice(["clamp", "limit", "bound"])
        return n, f"Write a Python function `{n}(x)` that clamps a number to the range [{lo}, {hi}].", \
            f"def {n}(x):\n    return max({lo}, min({hi}, x))", lambda: (rng.randrange(-20, 40),)
    if f == 7:
        n = rng.choice(["sum_even", "sum_odd"])
        cond = "x % 2 == 0" if n == "sum_even" else "x % 2 == 1"
        return n, f"Write a Python function `{n}(xs)` that returns the sum of the {n[4:]} numbers in a list.", \
            f"def {n}(xs):\n    return sum(x for x in xs if {cond})", lambda: (lists(),)
    if f == 8:
        n = rng.choice(["first", "take", "head"]) + f"_{k % 5 + 1}"
        m = k % 5 + 1
        return n, f"Write a Python function `{n}(xs)` that returns the first {m} elements of a list.", \
            f"def {n}(xs):\n    return xs[:{m}]", lambda: (lists(),)
    if f == 9:
        sep = rng.choice(["-", ", ", " | ", "+"])
        n = rng.choice(["repeat_word", "echo_word"])
        return n, f"Write a Python function `{n}(word)` that repeats a word {k} times joined by '{sep}'.", \
            f"def {n}(word):\n    return '{sep}'.join([word] * {k})", lambda: (rng.choice(["hi", "go", "la", "ok"]),)
    if f == 10:
        n = rng.choice(["is_palindrome", "reads_same_backwards"])
        return n, f"Write a Python function `{n}(s)` that checks whether a string is a palindrome, ignoring case.", \
            f"def {n}(s):\n    s = s.lower()\n    return s == s[::-1]", lambda: (rng.choice(["Level", "radar", "Stone", "abBA", "atlas", "x"]),)
    if f == 11:
        n = rng.choice(["reverse_words", "flip_words"])
        return n, f"Write a Python function `{n}(s)` that reverses the order of the words in a sentence.", \
            f"def {n}(s):\n    return ' '.join(reversed(s.split()))", lambda: (words(),)
    if f == 12:
        c = rng.choice("arste")
        n = f"words_starting_with_{c}"
        return n, f"Write a Python function `{n}(s)` that returns the words of a sentence that start with '{c}'.", \
            f"def {n}(s):\n    return [w for w in s.split() if w.startswith('{c}')]", lambda: (words(),)
    n = rng.choice(["dedupe", "unique_in_order"])
    return n, f"Write a Python function `{n}(xs)` that removes duplicates from a list and keeps the first occurrences in order.", \
        f"def {n}(xs):\n    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out", \
        lambda: ([rng.randrange(0, 5) for _ in range(rng.randrange(0, 7))],)


def code_record(rng):
    name, instr, src, args = code_family(rng)
    env = {}
    exec(src, env)  # the reference solution computes every example and test
    fn = env[name]
    a = args()
    call = f"{name}({', '.join(map(repr, a))})"
    inp = f"Example: {call} returns {fn(*a)!r}." if rng.random() < 0.6 else ""
    return {"instruction": instr, "input": inp, "output": src, "_fn": fn, "_args": args, "_name": name}


def code_records(rng, n):
    recs = unique(code_record, n, rng, key=lambda r: r["instruction"] + r["input"])
    out = []
    for i, r in enumerate(recs):
        rec = {k: r[k] for k in ("instruction", "input", "output")}
        if i < N_EVAL:
            tests = []
            for _ in range(50):  # three distinct asserts where the argument space allows
                a = r["_args"]()
                t = f"assert {r['_name']}({', '.join(map(repr, a))}) == {r['_fn'](*a)!r}"
                if t not in tests:
                    tests.append(t)
                if len(tests) == 3:
                    break
            env = {}
            exec(rec["output"] + "\n" + "\n".join(tests), env)  # the shipped tests pass on the reference
            rec["tests"] = tests
        out.append(rec)
    return out


# ---------------------------------------------------------------- general prose
PROSE = {
    "weather": ["The morning began grey, but by noon the clouds had thinned.",
                "A light wind came in from the west and cooled the streets.",
                "People carried umbrellas they never opened.",
                "By evening the sky had turned a clear, pale blue.",
                "Forecasts promised rain, yet the pavements stayed dry all day."],
    "markets": ["The Saturday market fills the square with noise and colour.",
                "Farmers arrive before sunrise to set up their stalls.",
                "A woman sells honey in jars of every size.",
                "Children trade coins for warm bread and apples.",
                "By two o'clock the tables are folded and the square is quiet again."],
    "libraries": ["The town library opens at nine and closes at six.",
                  "Students gather at the long tables near the windows.",
                  "The librarian knows where every atlas is kept.",
                  "A reading group meets there on the first Tuesday of the month.",
                  "Returned books wait on a trolley before going back to the shelves."],
    "trains": ["The regional train stops at every small station along the river.",
               "Commuters read, sleep or watch the fields go by.",
               "The conductor checks tickets with a friendly nod.",
               "Delays are rare, although snow can slow the line in winter.",
               "From the last carriage you can see the tracks curve behind you."],
    "cooking": ["A good soup starts with onions cooked slowly in butter.",
                "Fresh herbs should be added at the very end.",
                "Bread dough needs time and a warm place to rise.",
                "Many families share recipes that are never written down.",
                "Cooking for friends is as much about company as it is about food."],
    "gardens": ["Tomatoes need sun, water and a little patience.",
                "Weeds grow fastest in the weeks you are away.",
                "A compost heap turns kitchen scraps into rich soil.",
                "Bees visit the flowers that bloom in early morning.",
                "By late summer the garden gives more than one family can eat."],
    "museums": ["The small museum keeps tools used by the first settlers.",
                "Visitors often linger in front of the old maps.",
                "A guide explains how the harbour grew over two centuries.",
                "School groups come on weekday mornings.",
                "The cafe on the top floor looks out over the roofs."],
    "cycling": ["Cycling to work has become common in the city.",
                "New lanes separate bicycles from cars on the main roads.",
                "A basic repair kit fits easily in a small bag.",
                "Hills are hard at first but easier after a few weeks.",
                "Many riders say the ride clears their head before the day begins."],
    "rivers": ["The river runs slowly through the centre of the valley.",
               "In spring it rises with melted snow from the hills.",
               "Anglers sit on the banks from early morning.",
               "Old stone bridges connect the two halves of the town.",
               "Ducks gather wherever someone has brought bread."],
    "weekends": ["On weekends the town wakes up later than usual.",
                 "Families walk to the park after breakfast.",
                 "Shops open at ten and close early on Sunday.",
                 "Some people spend the afternoon reading in cafes.",
                 "The evening ends with long dinners and quiet streets."],
}


def prose_line(rng):
    topic = rng.choice(sorted(PROSE))
    return " ".join(rng.sample(PROSE[topic], rng.randrange(2, 4)))


# ---------------------------------------------------------------- writing
def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_csv(path, records):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"], lineterminator="\n")
        w.writeheader()
        w.writerows(records)


def main(argv=None):
    """Generates every sample file under --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = N_TRAIN + N_EVAL

    def rng(i):  # one stream per domain, so editing one domain leaves the others unchanged
        return random.Random(args.seed * 1000 + i)

    def path(domain, name):
        os.makedirs(os.path.join(args.out, domain), exist_ok=True)
        return os.path.join(args.out, domain, name)

    tr, ev = split(unique(legal_record, n, rng(1)))
    write_jsonl(path("legal", "train.jsonl"), tr), write_jsonl(path("legal", "eval.jsonl"), ev)
    tr, ev = split(unique(translation_record, n, rng(2), key=lambda r: r["completion"]))
    write_csv(path("translation", "train.csv"), tr), write_csv(path("translation", "eval.csv"), ev)
    tr, ev = split(unique(medical_record, n, rng(3)))
    write_jsonl(path("medical", "train.jsonl"), tr), write_jsonl(path("medical", "eval.jsonl"), ev)
    tr, ev = split(unique(creative_record, n, rng(4)))
    write_jsonl(path("creative", "train.jsonl"), tr), write_jsonl(path("creative", "eval.jsonl"), ev)
    tr, ev = split(code_records(rng(5), n))
    write_json(path("code", "train.json"), tr), write_json(path("code", "eval.json"), ev)
    lines = unique(prose_line, 100, rng(6), key=lambda s: s)
    with open(path("general", "eval.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote sample data under {args.out}")


if __name__ == "__main__":
    main()
