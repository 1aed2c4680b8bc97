"""Generate headlines.json: fictional-but-plausible local news headlines.

Each headline is an event template (with a few wording variants) instantiated
for one place.  The output is deterministic (fixed seed).  Beside it,
headline_templates.json records each headline's template id (its index in
TEMPLATES), so a train/held-out split can keep every headline of one event
template on one side.  Guarantees:

* every (place, event-template) pair occurs at most once,
* every headline string is unique,
* every headline has 6-14 words,
* templates that need a coast / river / snowy climate only get such places.

Usage:
    python make_headlines.py            # (re)write headlines.json and headline_templates.json
    python make_headlines.py --check    # verify both files match the generator
"""

import json
import random
import re
import sys
from pathlib import Path
from typing import NamedTuple

SEED = 20240611
USES_PER_TEMPLATE = 4
TARGET = 560

# name: tags.  c = on the coast, r = on a river, s = gets real winter snow,
# h = hot summers (heatwave headlines make sense), k = ski slopes nearby,
# x = no mainline railway.  A template tag "!x" means "places without tag x".
PLACES = {
    "Lisbon": "c r h", "Porto": "c r", "Valencia": "c h", "Marseille": "c h", "Nice": "c",
    "Genoa": "c", "Naples": "c h", "Bari": "c h", "Split": "c h", "Thessaloniki": "c h",
    "Izmir": "c h", "Tangier": "c", "Dakar": "c", "Accra": "c", "Mombasa": "c",
    "Durban": "c", "Cape Town": "c", "Perth": "c r h", "Adelaide": "c h", "Brisbane": "c r",
    "Hobart": "c r x", "Auckland": "c", "Wellington": "c", "Vancouver": "c r", "Halifax": "c s",
    "Boston": "c r s", "Charleston": "c h", "Savannah": "c r h", "San Diego": "c",
    "Seattle": "c", "Honolulu": "c x", "Valparaíso": "c", "Montevideo": "c r", "Recife": "c",
    "Cartagena": "c", "Busan": "c", "Yokohama": "c", "Kobe": "c", "Fukuoka": "c",
    "Da Nang": "c r h", "Penang": "c x", "Cebu": "c x", "Bergen": "c s k", "Gothenburg": "c r s",
    "Aarhus": "c s", "Gdańsk": "c r s", "Tallinn": "c s", "Riga": "c r s", "Rotterdam": "c r",
    "Antwerp": "r", "Bristol": "r", "Brighton": "c", "Plymouth": "c", "Aberdeen": "c r",
    "Galway": "c r", "Cork": "c r", "Bilbao": "c r", "San Sebastián": "c", "Malmö": "c",
    "Kiel": "c", "Trieste": "c", "Oslo": "c s k", "Helsinki": "c s", "Tromsø": "c s k",
    "Reykjavik": "c s k x", "Montreal": "r s k", "Quebec City": "r s k", "Winnipeg": "r s",
    "Calgary": "r s k", "Edmonton": "r s k", "Minneapolis": "r s", "Denver": "s h k",
    "Salt Lake City": "s h k", "Anchorage": "c s k", "Sapporo": "s k", "Harbin": "r s k",
    "Innsbruck": "r s k", "Salzburg": "r s k", "Zurich": "r s k", "Munich": "r s k", "Kraków": "r s",
    "Tampere": "s", "Umeå": "c r s", "Ottawa": "r s k", "Buffalo": "r s", "Lyon": "r h",
    "Seville": "r h", "Córdoba": "r h", "Bologna": "h", "Florence": "r h", "Verona": "r h",
    "Turin": "r h", "Ghent": "r", "Utrecht": "r", "Leipzig": "r", "Dresden": "r",
    "Heidelberg": "r", "Freiburg": "", "Basel": "r", "Graz": "r s k", "Brno": "",
    "Ljubljana": "r s k", "Zagreb": "r h", "Cluj-Napoca": "r s", "Tbilisi": "r h",
    "Kyoto": "r h", "Nagoya": "h", "Chengdu": "r h", "Kunming": "", "Chiang Mai": "r h",
    "Pune": "r h", "Jaipur": "h", "Mysore": "", "Kandy": "r", "Nairobi": "",
    "Kigali": "x", "Marrakech": "h", "Fez": "h", "Austin": "r h", "Nashville": "r h",
    "Pittsburgh": "r s k", "Cincinnati": "r s", "St. Louis": "r h", "Kansas City": "r h",
    "Tucson": "h", "Albuquerque": "r h", "Guadalajara": "h", "Puebla": "", "Oaxaca": "",
    "Medellín": "r", "Cusco": "", "Arequipa": "", "Mendoza": "h", "Canberra": "h",
    "Sheffield": "r", "Leeds": "r", "York": "r", "Edinburgh": "c", "Cambridge": "r",
    "Oxford": "r", "Nottingham": "r", "Lausanne": "s k", "Geneva": "r s k",
}

# (domain, required tag or "", template).  {a|b|c} = wording variants; each use
# of a template takes the next variant, so repeated templates read differently.
TEMPLATES = [
    # ---- local government ----
    ("local government", "", "{P} council approves {car-free Sundays|a new cycle lane network|longer library opening hours|free weekend parking} after public consultation"),
    ("local government", "", "{P} converts disused car park into {rooftop garden|community market|skate park|small urban forest}"),
    ("local government", "", "{P} city hall moves {building permits|parking permits|pet licences|market stall bookings} fully online"),
    ("local government", "", "{P} residents vote to name new footbridge after {a beloved local baker|the city's oldest tree|a retired schoolteacher|a famous local poet}"),
    ("local government", "", "{P} plants {5,000|12,000|20,000|8,000} street trees in three-year greening drive"),
    ("local government", "", "{P} trials {quiet zones|water refill stations|shaded benches|pop-up play streets} on busy shopping streets"),
    ("local government", "", "{P} launches repair cafés where residents fix {bicycles|clothing|lamps|small appliances} for free"),
    ("local government", "", "{P} to replace all streetlights with LED lamps by {2027|next spring|the end of 2026|2028}"),
    ("local government", "", "{P} lowers speed limit to 30 km/h near {schools|parks|markets|hospitals}"),
    ("local government", "", "{P} adds hundreds of {public drinking fountains|bike racks|recycling points|benches} across old town"),
    ("local government", "", "{P} unveils redesigned main square with {fountains|shaded seating|a new play area|a bandstand}"),
    ("local government", "", "{P} begins restoring its {century-old|historic|long-neglected|iron-framed} covered market"),
    ("local government", "", "{P} allotment waiting list hits record as {gardening booms|young families sign up|demand doubles|retirees join}"),
    ("local government", "", "{P} council offers grants for {green roofs|rainwater tanks|home insulation|heat pumps}"),
    ("local government", "", "{P} extends free museum entry to {students|residents under 25|pensioners|all residents on Sundays}"),
    # ---- science ----
    ("science", "", "{P} university researchers map {urban bat|city fox|hedgehog|swift} populations with help from volunteers"),
    ("science", "", "{P} lab grows {lettuce|tomatoes|strawberries|herbs} using recycled wastewater"),
    ("science", "", "{P} university team builds robot that sorts {recycling|library books|hospital laundry|lost property}"),
    ("science", "", "Archaeologists in {P} uncover {an ancient well|centuries-old pottery|a forgotten cellar|old coins} beneath car park"),
    ("science", "", "{P} scientists develop {biodegradable packaging from seaweed|self-healing concrete using bacteria|a low-cost water filter|insulation made from straw}"),
    ("science", "", "{P} museum scans {dinosaur skeleton|ancient shipwreck timbers|rare meteorite|medieval armour} to create detailed 3D model"),
    ("science", "", "{P} students launch weather balloon that reaches the edge of space"),
    ("science", "", "{P} volunteers record {surprising rise in butterfly numbers|rare orchids on roadside verges|more bird species than expected|unusually high dragonfly counts}"),
    ("science", "", "{P} university opens public lab where residents can test {garden soil|tap water|air quality|food labels}"),
    ("science", "", "{P} researchers track city honeybees with tiny {radio tags|barcodes|sensors|cameras}"),
    ("science", "", "Study in {P} links regular {walking|gardening|dancing|volunteering} to better mood in older adults"),
    ("science", "", "{P} planetarium reopens with new {full-dome projector|star show|children's gallery|night-sky café}"),
    ("science", "", "{P} university telescope captures {detailed images of Jupiter|a distant spiral galaxy|a passing comet|the Orion Nebula}"),
    ("science", "c", "{P} marine scientists tag {sharks|sea turtles|dolphins|seabirds} to study local migration routes"),
    ("science", "", "{P} botanic garden's giant flower blooms for first time in {ten|twelve|seven|fifteen} years"),
    # ---- weather ----
    ("weather", "", "{P} records its {wettest|warmest|windiest|sunniest} {April|October|March|September} since records began"),
    ("weather", "", "Dense fog delays {morning flights|commuter buses|school runs|delivery vans} across {P}"),
    ("weather", "s", "Heavy snowfall brings {P} {to a standstill|its first snow day in years|a weekend of sledging|record snowdrifts}"),
    ("weather", "h", "{P} opens cooling centres as temperatures pass {38|40|39|41} degrees"),
    ("weather", "", "Hailstorm dents cars across {P}, {no injuries reported|roofs checked for damage|gardens flattened|traffic briefly halted}"),
    ("weather", "r", "{P} river rises after heavy rain, {riverside paths closed|boat trips paused|flood barriers raised|car parks closed}"),
    ("weather", "", "Strong winds topple {market stalls|holiday decorations|scaffolding|festival tents} in {P}"),
    ("weather", "", "{P} installs sensors to warn residents about {flash floods|poor air quality|extreme heat|icy roads}"),
    ("weather", "", "Rare {double rainbow|lunar halo|snow flurry|sun halo} delights early risers in {P}"),
    ("weather", "k", "{P} ski slopes open early after {heavy November snow|an early cold snap|weeks of frost|a snowy autumn}"),
    ("weather", "", "Unseasonal warmth brings {cherry blossoms|daffodils|magnolias|crocuses} out early in {P}"),
    ("weather", "c", "{P} beaches reopen after {storm cleanup|seaweed removal|unusually high tides|winter repairs}"),
    ("weather", "", "{P} weather station celebrates {100|150|125|175} years of daily records"),
    ("weather", "", "Thunderstorm knocks out power to {2,000|5,000|3,000|8,000} homes in {P} for several hours"),
    # ---- sports ----
    ("sports", "", "{P} marathon draws record {18,000|25,000|31,000|22,000} runners"),
    ("sports", "", "{P} amateur {rowing|rugby|netball|cricket} club wins first national title in decades"),
    ("sports", "", "{P} hosts national {swimming|gymnastics|fencing|judo} championships at renovated arena"),
    ("sports", "!x", "{P} opens {floodlit|covered|free|rooftop} basketball courts in former rail yard"),
    ("sports", "", "{P} youth football team reaches {international cup final|national semi-finals|continental youth final|its first cup final}"),
    ("sports", "", "{P} cycling race returns after {ten|twelve|eight|fifteen}-year absence"),
    ("sports", "", "{P} chess club teenager wins {regional|national|international|under-16} junior title"),
    ("sports", "", "{P} stadium to host {women's rugby|athletics|ice hockey|volleyball} finals next summer"),
    ("sports", "", "{P} public swimming pool reopens after {two-year|eighteen-month|year-long|three-year} renovation"),
    ("sports", "", "{P} skatepark expansion approved after {youth campaign|petition by local teenagers|two-year wait|neighbourhood vote}"),
    ("sports", "", "{P} climbing gym hosts first international bouldering competition"),
    ("sports", "", "{P} volunteers build {trail network|BMX track|running loop|mountain bike park} on hillside"),
    ("sports", "", "{P} football club unveils {solar-powered stadium roof|new youth academy|first women's team|community sports hall}"),
    ("sports", "c", "Record crowds watch {P} {regatta|harbour swim|sailing week|open-water race}"),
    ("sports", "r", "{P} dragon boat festival attracts record number of teams"),
    ("sports", "", "{P} hosts {wheelchair basketball|blind football|para-cycling|sitting volleyball} tournament for first time"),
    ("sports", "", "{P} park run celebrates its {500th|1,000th|250th|750th} weekly event"),
    # ---- business ----
    ("business", "", "{P} bakery chain switches to {electric delivery bikes|a four-day week|zero-waste packaging|solar-powered ovens}"),
    ("business", "", "{P} startup raises funds for {vertical farming|battery recycling|drone deliveries|plant-based leather}"),
    ("business", "", "{P} farmers market expands to {seven days a week|a second location|evening hours|a covered hall}"),
    ("business", "c", "{P} port handles record cargo volumes in {first quarter|summer season|spring|second quarter}"),
    ("business", "", "{P} shoe factory reopens, bringing {200|350|120|400} jobs back to town"),
    ("business", "", "{P} coffee roaster wins international award for {single-origin espresso|sustainable sourcing|its house blend|cold brew}"),
    ("business", "", "{P} high street vacancy rate falls to {ten-year|fifteen-year|record|twenty-year} low"),
    ("business", "", "{P} chocolate maker opens {visitor centre|factory tours|tasting school|museum shop}"),
    ("business", "", "{P} juice company turns leftover fruit peel into {candles|cleaning spray|animal feed|compost}"),
    ("business", "", "{P} hotels report record occupancy during {festival season|summer|winter holidays|spring break}"),
    ("business", "", "{P} craft fair stalls sell out within {hours|a day|a week|minutes}"),
    ("business", "", "{P} bookshop celebrates {100|125|150|75} years with week of readings"),
    ("business", "", "{P} cooperative bank offers cheap loans for {solar panels|small farms|home repairs|electric bikes}"),
    ("business", "", "{P} textile mill revives traditional {wool|linen|silk|cotton} weaving"),
    ("business", "c", "{P} fish market moves to new waterfront hall"),
    ("business", "", "{P} tourism office reports surge in {off-season|cycling|rail|walking} visitors"),
    ("business", "", "{P} family toy shop marks {50|60|80|100} years in the same building"),
    # ---- culture ----
    ("culture", "", "{P} museum reopens after {three-year|two-year|four-year|eighteen-month} renovation with new {galleries|rooftop café|sculpture garden|learning centre}"),
    ("culture", "", "{P} orchestra performs free concert in {the main square|a city park|the central station|a shopping centre}"),
    ("culture", "", "{P} film festival announces {record entries|new documentary prize|outdoor screenings|a youth jury}"),
    ("culture", "", "{P} public library launches {a seed-sharing scheme|a tool lending service|an instrument lending scheme|a board game collection}"),
    ("culture", "", "Lost {painting|manuscript|map|photograph album} found in {P} attic goes on display"),
    ("culture", "", "{P} street art festival transforms {twenty|thirty|forty|fifty} blank walls"),
    ("culture", "", "{P} theatre company tours {villages|schools|hospitals|care homes} with open-air show"),
    ("culture", "", "{P} celebrates {500th|800th|thousandth|600th} anniversary with year of events"),
    ("culture", "", "{P} jazz festival moves to larger venue after sell-out year"),
    ("culture", "", "{P} community choir of {200|400|300|500} singers sets local record"),
    ("culture", "", "{P} opens community pottery studio in former fire station"),
    ("culture", "", "{P} poetry prize attracts entries from {40|60|35|50} countries"),
    ("culture", "", "{P} book festival adds {children's programme|translation prize|graphic novel day|poetry tent}"),
    ("culture", "", "Century-old {carousel|pipe organ|town clock|puppet theatre} restored to working order in {P}"),
    ("culture", "r", "{P} lantern parade draws {thousands|families|record crowds|visitors} to riverside"),
    ("culture", "", "{P} art school graduates display work in empty shop windows"),
    ("culture", "", "{P} historic cinema reopens with {silent film nights|community screenings|a restored organ|classic matinees}"),
    ("culture", "", "{P} dance festival brings {tango|folk|contemporary|street} dancers from around the world"),
    ("culture", "", "{P} food festival celebrates {street food|regional recipes|local cheeses|home baking}"),
    # ---- transport ----
    ("transport", "", "{P} bus network adds night service after record {summer|winter|spring|autumn} ridership"),
    ("transport", "", "{P} opens {six-kilometre|ten-kilometre|eight-kilometre|four-kilometre} protected cycle lane linking suburbs to centre"),
    ("transport", "", "{P} launches bike-share scheme with {500|1,200|800|2,000} electric bikes"),
    ("transport", "!x", "{P} railway station gets {rooftop solar panels|a new footbridge|step-free access|a restored clock tower}"),
    ("transport", "c", "{P} ferry service {resumes|expands} to nearby islands"),
    ("transport", "", "{P} trials driverless shuttle buses on {a campus loop|a hospital route|a waterfront route|an airport route}"),
    ("transport", "", "{P} pedestrianises {main street|the old market lane|historic centre|station square} after successful trial"),
    ("transport", "", "{P} electric buses replace diesel fleet {a year early|ahead of schedule|within two years|by summer}"),
    ("transport", "", "{P} to build new pedestrian bridge across {the rail tracks|the ring road|the main highway|the old canal}"),
    ("transport", "", "{P} commuters get real-time bus tracking app"),
    ("transport", "!x", "{P} welcomes return of overnight sleeper train service"),
    ("transport", "", "{P} airport adds direct flights to {three|five|four|six} new destinations"),
    ("transport", "", "{P} car-sharing club passes {10,000|20,000|15,000|5,000} members"),
    ("transport", "", "{P} school bus routes redesigned to cut journey times"),
    ("transport", "", "Cargo bikes to deliver parcels in central {P}"),
    ("transport", "", "{P} adds {free|cheaper|weekend|family} park-and-ride service for shoppers"),
    # ---- health ----
    ("health", "", "{P} hospital opens {rooftop healing garden|new children's wing|24-hour walk-in clinic|eye care centre}"),
    ("health", "", "{P} pharmacies offer free {blood pressure|hearing|eye|cholesterol} checks this month"),
    ("health", "", "{P} launches free {swimming|yoga|walking|dance} sessions for over-sixties"),
    ("health", "", "{P} clinic trials {text message reminders|evening appointments|video consultations|weekend hours} to cut waiting times"),
    ("health", "", "{P} volunteer drivers take patients to appointments from rural villages"),
    ("health", "", "{P} blood donation drive beats target by {40|60|25|80} percent"),
    ("health", "", "{P} dentists visit primary schools in free check-up scheme"),
    ("health", "", "{P} exercise-on-prescription scheme helps {1,000|2,000|1,500|3,000} residents get active"),
    ("health", "", "{P} hospital kitchen switches to locally grown produce"),
    ("health", "", "{P} parks add outdoor exercise equipment for all ages"),
    ("health", "", "{P} children's hospital welcomes therapy dogs to calm young patients"),
    ("health", "", "{P} opens new {mental health drop-in centre|sports injury clinic|hearing centre|family health hub}"),
    # ---- technology ----
    ("technology", "", "{P} installs free public Wi-Fi across {city centre|all libraries|bus stations|public parks}"),
    ("technology", "", "{P} startup app matches surplus restaurant food with local charities"),
    ("technology", "", "{P} library runs {coding|smartphone|online safety|video calling} classes for seniors"),
    ("technology", "", "{P} uses drones to {inspect bridges|count nesting birds|map tree cover|survey rooftops}"),
    ("technology", "", "{P} smart bins alert crews when full, cutting collection trips"),
    ("technology", "", "{P} university opens {robotics|artificial intelligence|quantum computing|battery research} centre"),
    ("technology", "", "{P} hackathon produces app for finding free parking"),
    ("technology", "", "{P} water utility tests sensors that detect leaking pipes"),
    ("technology", "", "{P} digital archive puts {100 years|a century|150 years|two centuries} of local newspapers online"),
    ("technology", "", "{P} school district gives every student a {laptop|tablet}"),
    ("technology", "", "{P} startup's delivery robots begin pavement trials"),
    ("technology", "", "{P} data centre heat warms {public pool|nearby homes|greenhouses|a school}"),
    ("technology", "", "{P} museum uses augmented reality to bring old streets back to life"),
    # ---- education ----
    ("education", "", "{P} primary school opens outdoor classroom in {nearby woodland|school garden|playground|old orchard}"),
    ("education", "", "{P} university offers free {evening|weekend|online|summer} courses for residents"),
    ("education", "", "{P} schools introduce {cooking|first aid|money management|gardening} lessons for all pupils"),
    ("education", "", "{P} adult education centre sees record enrolment in {language|carpentry|computing|bookkeeping} classes"),
    ("education", "", "{P} students design {solar car|weather app|recycling robot|water filter} that wins national contest"),
    ("education", "", "{P} school library passes {10,000|25,000|15,000|50,000} books borrowed this year"),
    ("education", "", "{P} teenagers restore {vintage bus|steam engine|railway carriage|old fire engine} in school project"),
    ("education", "", "{P} college opens training centre for {plumbers|electricians|stonemasons|carpenters}"),
    ("education", "", "{P} children's museum opens hands-on {science|engineering|space|water} gallery"),
    ("education", "", "{P} secondary school twins with partner school in {Japan|Brazil|Kenya|Canada}"),
    ("education", "", "{P} university builds student housing from {timber|recycled shipping containers|straw bales|reclaimed brick}"),
    ("education", "", "{P} school choir wins {regional|national|international|youth} competition"),
    ("education", "", "{P} kindergarten moves lessons outdoors {one day a week|every morning|all summer|twice a week}"),
    # ---- environment ----
    ("environment", "r", "{P} river cleanup removes {two|five|three|four} tonnes of litter"),
    ("environment", "", "{P} bans single-use plastic at {public events|city markets|council buildings|sports grounds}"),
    ("environment", "", "{P} wetland restoration brings back {otters|herons|frogs|kingfishers}"),
    ("environment", "", "{P} nature reserve welcomes back {beavers|storks|otters|cranes} after decades-long absence"),
    ("environment", "", "{P} volunteers plant {50,000|80,000|30,000|100,000} trees on former farmland"),
    ("environment", "", "{P} composting scheme diverts {30|45|40|35} percent of household food waste"),
    ("environment", "", "{P} solar farm now powers {10,000|25,000|15,000|40,000} homes"),
    ("environment", "c", "{P} beach cleanup attracts {500|1,200|800|2,000} volunteers"),
    ("environment", "!x", "{P} turns old railway line into green walking corridor"),
    ("environment", "", "{P} community garden wins national award"),
    ("environment", "", "{P} installs {1,000|2,000|500|1,500} nest boxes for swifts on new buildings"),
    ("environment", "", "{P} air quality reaches best level in {twenty|thirty|forty|fifteen} years"),
    ("environment", "", "{P} bans leaf blowers in {residential streets|city parks|school grounds|cemeteries} to cut noise"),
    ("environment", "", "{P} sows wildflower verges along {main roads|the ring road|cycle paths|railway embankments}"),
    ("environment", "", "{P} launches city-wide {textile|electronics|battery|mattress} recycling scheme"),
    ("environment", "", "{P} eco-festival draws thousands to {the city park|the botanic garden|the town square|the exhibition grounds}"),
]

WORDS_MIN, WORDS_MAX = 6, 14


def variants(template):
    """Return the wording variants of a template: the k-th uses choice k of every group."""
    groups = re.findall(r"\{([^{}]*\|[^{}]*)\}", template)
    n = max([len(g.split("|")) for g in groups] or [1])
    out = []
    for k in range(n):
        s = template
        for g in groups:
            alts = g.split("|")
            s = s.replace("{" + g + "}", alts[k % len(alts)], 1)
        out.append(s)
    return out


def fits(need, place_tags):
    if not need:
        return True
    if need.startswith("!"):
        return need[1:] not in place_tags
    return need in place_tags


class Headline(NamedTuple):
    place: str
    template: int  # index into TEMPLATES: the event template (its id in headline_templates.json)
    domain: str
    text: str


def make_headlines():
    """The headlines, in headlines.json order, each with its place, template id and domain."""
    rng = random.Random(SEED)
    places = list(PLACES)
    tags = {p: set(PLACES[p].split()) for p in places}
    use_count = {p: 0 for p in places}
    rows = []  # (place, template_index, domain, headline)
    seen_pairs, seen_text = set(), set()
    order = list(range(len(TEMPLATES)))
    for k in range(USES_PER_TEMPLATE):
        rng.shuffle(order)
        for ti in order:
            domain, need, tmpl = TEMPLATES[ti]
            vs = variants(tmpl)
            text_t = vs[k % len(vs)]
            cands = [p for p in places if fits(need, tags[p]) and (p, ti) not in seen_pairs]
            rng.shuffle(cands)
            cands.sort(key=lambda p: use_count[p])  # balance places
            for p in cands:
                h = text_t.replace("{P}", p)
                h = h[0].upper() + h[1:]
                if h.lower() in seen_text:
                    continue
                n = len(h.split())
                if not (WORDS_MIN <= n <= WORDS_MAX):
                    continue
                rows.append(Headline(p, ti, domain, h))
                seen_pairs.add((p, ti))
                seen_text.add(h.lower())
                use_count[p] += 1
                break
    rng.shuffle(rows)
    rows = rows[:TARGET]
    return rows


def template_record(rows):
    """headline_templates.json: every template (id, domain, wording) and, in headlines.json order, each
    headline's template id."""
    return {
        "templates": [{"id": i, "domain": d, "template": t} for i, (d, _, t) in enumerate(TEMPLATES)],
        "headlines": [{"headline": r.text, "template": r.template} for r in rows],
    }


def dump_record(record):
    """JSON with one template / headline a line (diffs of the file stay readable)."""
    parts = []
    for key, items in record.items():
        lines = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in items)
        parts.append(f" {json.dumps(key)}: [\n{lines}\n ]")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main():
    out = Path(__file__).with_name("headlines.json")
    out_templates = Path(__file__).with_name("headline_templates.json")
    rows = make_headlines()
    headlines = [r.text for r in rows]
    assert len(set((r.place, r.template) for r in rows)) == len(rows)
    assert len(set(h.lower() for h in headlines)) == len(headlines)
    assert all(WORDS_MIN <= len(h.split()) <= WORDS_MAX for h in headlines)
    if "--check" in sys.argv:
        ok = json.loads(out.read_text(encoding="utf-8")) == headlines
        ok_t = json.loads(out_templates.read_text(encoding="utf-8")) == template_record(rows)
        print("headlines.json matches generator" if ok else "headlines.json DIFFERS from generator")
        print("headline_templates.json matches generator" if ok_t else "headline_templates.json DIFFERS from generator")
        sys.exit(0 if ok and ok_t else 1)
    out.write_text(json.dumps(headlines, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    out_templates.write_text(dump_record(template_record(rows)), encoding="utf-8")
    by_domain = {}
    for r in rows:
        by_domain[r[2]] = by_domain.get(r[2], 0) + 1
    print(f"wrote {len(headlines)} headlines from {len(TEMPLATES)} templates, "
          f"{len(set(r[0] for r in rows))} places -> {out}, {out_templates.name}")
    print("per domain:", dict(sorted(by_domain.items())))


if __name__ == "__main__":
    main()
